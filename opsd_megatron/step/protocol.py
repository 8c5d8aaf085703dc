"""What one training step is to the loop: a small strategy interface, its output, and the plumbing both
strategies share (packing for this layout, the global token count, the optimizer update).

    step = OPSDStep(state)                      # or SFTStep(state); state: run.setup.RunState
    samples, stats = step.samples(n)            # OPSD: rollouts (collective); SFT: reference solutions
    out = step.train(samples, capture=True)     # pack, forward(s) + backward, optimizer: a StepOutput
    metrics = step.metrics(stats, out)          # global metrics of the step (collective)

The loop (`opsd_megatron.run.trainer.Trainer`) calls `samples`, then (when `needs_engine`) puts the engine to
sleep, calls `train`, wakes the engine and refreshes its weights. `make_teacher` is called during set-up,
before the strategy exists (the teacher is made from the initial weights θ₀, before a checkpoint loads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
import torch.distributed as dist

from opsd_megatron.config import OPSDConfig
from opsd_megatron.mcore.models.builder import unwrap
from opsd_megatron.rollout.base import Sample
from opsd_megatron.step.batch import MicroBatch, pack_for_step
from opsd_megatron.step.teacher import Teacher

if TYPE_CHECKING:  # annotations only
    from opsd_megatron.run.setup import RunState


@dataclass
class StepOutput:
    """What one step's `train` hands back to the loop (this rank's view)."""

    sums: dict[str, float]
    """This rank's loss sums over its micro-batches (zeros off the last stage); `metrics` reduces them."""
    grad_norm: float
    """Global gradient norm before clipping (nan when the optimizer did not report one)."""
    update_ok: bool
    """False when the optimizer skipped the update (inf/nan gradients with a loss scaler)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase (`time/...` metric names)."""
    divergences: list | None = None
    """With `capture`: per micro-batch (per-token losses [b, R], loss mask [b, R]) for rollouts.jsonl."""


class Step(Protocol):
    """The strategy the one training loop runs; built as `Step(state)` after set-up."""

    needs_engine: ClassVar[bool]
    """True: the run builds a rollout engine; the loop sleeps/wakes and refreshes it around `train`."""

    @staticmethod
    def make_teacher(cfg: OPSDConfig, chunks: list, build_fn: Callable[[], list]) -> Teacher:
        """The teacher over the student's (unwrapped, LoRA-applied) `chunks`; `build_fn` builds a copy."""
        ...

    def samples(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """This data-parallel replica's samples of `step` and their per-replica stats."""
        ...

    def train(self, samples: list[Sample], *, capture: bool = False) -> StepOutput:
        """Forward(s), backward, optimizer and schedule step on this replica's samples. Collective."""
        ...

    def metrics(self, stats: dict[str, float], out: StepOutput) -> dict[str, float]:
        """The step's global metrics (the same on every rank). Collective."""
        ...


def pack(state: RunState, samples: list[Sample]) -> list[MicroBatch]:
    """`pack_for_step` for this run's layout: sequence-parallel rounding, and one padded length over DP for
    MoE models at DP > 1 (EP ranks all-gather tokens; at every EP size, so the routed padding and the router
    aux loss do not depend on EP). Collective over DP in the MoE case."""
    if state.safe_point is not None:  # after the rollout: a stop deadline may abandon the step here
        state.safe_point("after the rollout")
    cfg = state.cfg
    uniform = state.ps.dp_group if state.info.spec.is_moe and state.dp > 1 else None
    return pack_for_step(samples, micro_batch_size=cfg.train.micro_batch_size, pad_id=state.pad_id,
                         pad_to_multiple=cfg.train.pad_to_multiple, tp=state.ps.tp,
                         sequence_parallel=cfg.parallel.sequence_parallel, uniform_group=uniform,
                         group_by_length=group_by_length(state), cp=state.ps.cp)  # fmt: skip


def group_by_length(state: RunState) -> bool:
    """`train.group_by_length`, when the model can run it: at PP > 1 the chunks' config must send shapes
    between stages (`variable_seq_lengths`, set at build unless the MoE dispatcher refuses it)."""
    if not state.cfg.train.group_by_length:
        return False
    return state.ps.pp == 1 or bool(getattr(unwrap(state.chunks[0]).config, "variable_seq_lengths", False))


def global_tokens(state: RunState, mbs: list[MicroBatch]) -> int:
    """G: the step's response tokens in the loss over all micro-batches and DP replicas (the loss is
    normalised by it). Collective: one all-reduce over DP when DP > 1."""
    local = torch.tensor([sum(m.num_tokens for m in mbs)], dtype=torch.long)
    if state.dp > 1:
        dist.all_reduce(local, group=state.ps.dp_group)
    return int(local.item())


def zero_grads(state: RunState) -> None:
    """Clear the DDP gradient buffers and the optimizer's gradients before a backward pass."""
    for c in state.chunks:
        c.zero_grad_buffer()
    state.optimizer.zero_grad()


def optimizer_step(state: RunState) -> tuple[bool, float]:
    """Megatron optimizer step (grad-norm clipping) and one scheduler step: (update_ok, grad_norm).

    Before it, the stop deadline's safe point (`state.safe_point`): when it abandons the step the
    gradients are zeroed and `run.signals.StepAbandoned` propagates; weights, optimizer and schedule are
    those of the last completed step."""
    if state.safe_point is not None:
        try:
            state.safe_point("before the optimizer step")
        except Exception:
            zero_grads(state)
            raise
    ok, grad_norm, _ = state.optimizer.step()
    state.scheduler.step(increment=1)
    return bool(ok), float(grad_norm) if grad_norm is not None else float("nan")
