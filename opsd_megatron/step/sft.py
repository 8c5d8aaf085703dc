"""`algorithm: sft`: cross-entropy on the reference solutions, the warm start before self-distillation.

    opsd-train examples/synthetic_sft.yaml        # a config with `algorithm: sft`

`SFTStep` is a `step.protocol.Step`: loop, data, prompts, packing, checkpoints, metrics and HF export are
OPSD's; no rollout engine, no teacher copy. Samples: per problem, one sequence per `sft.formats` entry, the
"student" (problem) or "teacher" (problem + solution) prompt ‖ reference solution ‖ EOS, the solution in the
response's place. Loss: token-mean cross-entropy over the response tokens, normalised by the GLOBAL number of
response tokens as OPSD's; the last stage multiplies the response positions' hidden states [b, R, h] with its
LM-head shard into vocab-parallel logits [b, R, v/tp] (never [b, S, v]). Metrics: `loss`, `response_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy

from opsd_megatron.config import OPSDConfig
from opsd_megatron.losses._math import shard_layout
from opsd_megatron.mcore.models.forward import output_weight
from opsd_megatron.observe.metrics import reduce_sums
from opsd_megatron.rollout.base import Sample
from opsd_megatron.step.batch import MicroBatch, gather_positions, padding_fraction
from opsd_megatron.step.opsd import student_forward_backward
from opsd_megatron.step.protocol import StepOutput, global_tokens, optimizer_step, pack, zero_grads
from opsd_megatron.step.teacher import Teacher, make_teacher

if TYPE_CHECKING:  # annotations only
    from opsd_megatron.run.setup import RunState


def masked_vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, vocab_size: int | None,
                                        tp_group=None) -> torch.Tensor:  # fmt: skip
    """Per-position cross-entropy of vocab-parallel `logits` [..., v/tp] against global ids `target` [...];
    entries at global index >= `vocab_size` (padding) are left out. Collectives: 3 all-reduces over TP."""
    _, n_valid = shard_layout(logits.shape[-1], tp_group, vocab_size, None)
    if n_valid < logits.shape[-1]:
        valid = torch.arange(logits.shape[-1], device=logits.device) < n_valid
        logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    else:
        logits = logits.clone()  # Megatron's function subtracts the max in place
    return vocab_parallel_cross_entropy(logits, target)


class SFTStep:
    """The SFT strategy: reference solutions as samples, cross-entropy as the loss."""

    needs_engine = False

    def __init__(self, state: RunState):
        self.state = state

    @staticmethod
    def make_teacher(cfg: OPSDConfig, chunks: list, build_fn: Callable[[], list]) -> Teacher:
        return make_teacher("current", chunks)  # never used for SFT; no weight copy

    def samples(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        st, eos, out = self.state, self.state.tokenizer.eos_token_id, []
        for i in st.sampler.replica_slice(step, st.ps.dp_rank, st.dp):
            s, t = st.prompts(i)  # checked against prompts.max_prompt_tokens
            sol = st.tokenizer.encode(st.problems[i].solution, add_special_tokens=False) + [eos]
            out += [Sample(s if fmt == "student" else t, [st.pad_id], sol) for fmt in st.cfg.sft.formats]
        return out, {}

    def loss(self, scale: float, weight: torch.Tensor, mb: MicroBatch, _, hidden: torch.Tensor):
        """hidden: the last stage's final hidden states [b, S, h]; weight: the LM-head shard [v/tp, h]."""
        st = self.state
        h = gather_positions(hidden, mb.student_index)  # [b, R, h]
        if st.ps.tp > 1 and not st.cfg.parallel.sequence_parallel:
            h = copy_to_tensor_model_parallel_region(h)  # backward: all-reduce the partial grads over TP
        logits = torch.matmul(h, weight.t())  # [b, R, v/tp]: response positions only
        ce = masked_vocab_parallel_cross_entropy(
            logits, mb.response_ids, vocab_size=st.info.vocab_size, tp_group=st.ps.tp_group
        )  # [b, R]
        loss_sum = (ce * mb.loss_mask).sum()
        sums = {"loss_sum": loss_sum.detach().double(), "tokens": torch.tensor(float(mb.num_tokens)).double()}
        return loss_sum * scale, sums

    def train(self, samples: list[Sample], *, capture: bool = False) -> StepOutput:
        st = self.state
        mbs = [m.to(st.ps.device) for m in pack(st, samples)]
        scale = st.dp * len(mbs) / max(global_tokens(st, mbs), 1)
        weight = output_weight(st.chunks[-1]) if st.ps.is_last_stage else None
        zero_grads(st)
        loss = partial(self.loss, scale, weight)
        sums = student_forward_backward(st.chunks, mbs, [None] * len(mbs), loss, ("loss_sum", "tokens"),
                                        micro_batch_size=st.cfg.train.micro_batch_size)  # fmt: skip
        # counted like the loss sums: on the last stage (metrics divide by TP), zeros elsewhere
        pad = padding_fraction(mbs, teacher=False) if st.ps.is_last_stage else (0.0, 0.0)
        sums["pad_positions"], sums["positions"] = pad
        ok, grad_norm = optimizer_step(st)
        return StepOutput(sums, grad_norm, ok)

    def metrics(self, stats: dict[str, float], out: StepOutput) -> dict[str, float]:
        # Each TP rank of the last stage holds the same (all-reduced) loss: count it once.
        g = reduce_sums({k: v / self.state.ps.tp for k, v in out.sums.items()})
        return {"loss": g["loss_sum"] / max(g["tokens"], 1.0), "response_tokens": g["tokens"],
                "grad_norm": out.grad_norm, "update_ok": float(out.update_ok),
                "batch/padding_fraction": g["pad_positions"] / max(g["positions"], 1.0)}  # fmt: skip
