"""The OPSD step: `OPSDStep`, the strategy the training loop runs (rollout -> pack -> teacher forward ->
student forward + backward -> optimizer -> teacher update), built on free functions for its two passes on
hidden states and its metrics, callable without a rollout engine (tests, benchmarks).

    step = OPSDStep(state)                        # state: run.setup.RunState
    samples, stats = step.samples(n)              # the step's rollouts (rollout.collect)
    out = step.train(samples)                     # a step.protocol.StepOutput
    metrics = step.metrics(stats, out)

The free functions:

    with teacher.forward_context() as t_chunks:
        t_hidden, t_weight = teacher_hidden(t_chunks, mbs, micro_batch_size=2)     # [b, R, h] per mb
    sums = student_step(chunks, mbs, t_hidden, t_weight, spec, scale=dp * M / G, micro_batch_size=2)
    metrics = step_metrics(sums, rollout_stats, n_samples, reporter=is_last_stage and tp_rank == 0)

Memory: the last pipeline stage stops before the LM head (`models.forward.hidden_states_forward`) and
keeps only the response positions' final hidden states: the teacher stores `[b, R, h]` (model dtype) per
micro-batch, the student's loss function gets `[b, S, h]`, selects `[b, R, h]` and calls
`losses.fused_linear_divergence` with the vocabulary-parallel LM-head shards (student's; the teacher's own
for frozen/EMA teachers, the same weight for adapters_off/current), which walks the valid response tokens
in chunks. No `[*, T, v/tp]` tensor for all positions exists; prompt positions never reach the LM head.

One pass: the same chunk loop returns the loss, the step statistics (clipped fraction, entropies) and the
student's log-probabilities of the sampled tokens under the engine's sampling distribution (drift check).

Loss normalisation: each micro-batch returns sum_loss · scale with scale = DP · M / G (G = global number of
response tokens in the loss, all micro-batches and DP replicas); Megatron divides by M, DDP averages over
DP, so the gradient is that of Σ/G.

Metrics, one reduction path: each data-parallel replica reports its sums once, from its last-stage TP-rank-0
rank (`reporter`); every other rank passes zeros; one all-reduce SUM over the world, then ratios.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
from megatron.core import parallel_state as mps
from megatron.core.pipeline_parallel import get_forward_backward_func

from opsd_megatron.config import OPSDConfig
from opsd_megatron.config.schema import loss_beta, loss_clip
from opsd_megatron.losses import fused_linear_divergence
from opsd_megatron.losses.behaviour import offpolicy_sums, truncated_weight
from opsd_megatron.mcore.models.forward import hidden_states_forward, output_weight
from opsd_megatron.observe.metrics import reduce_sums
from opsd_megatron.rollout.base import Sample
from opsd_megatron.rollout.refresh.drift import DRIFT_BIN_KEYS, DRIFT_CLAMP, bins_quantile, drift_bins
from opsd_megatron.step.batch import (
    MicroBatch,
    gather_positions,
    in_sample_order,
    padding_fraction,
    skip_first_tokens,
)
from opsd_megatron.step.context_parallel import capture_over_cp, for_cp_rank, gather_held, sum_over_cp
from opsd_megatron.step.protocol import StepOutput, global_tokens, optimizer_step, pack, zero_grads
from opsd_megatron.step.teacher import Teacher, make_teacher

if TYPE_CHECKING:  # annotations only
    from opsd_megatron.run.setup import RunState

SUM_KEYS = ("loss_sum", "tokens", "clipped_fraction", "student_entropy", "teacher_entropy",
            "drift_abs", "drift_mult", "ratio_sum", "ratio_gt2", "ratio_max", *DRIFT_BIN_KEYS)  # fmt: skip
"""Per-micro-batch sums returned by the loss function (last stage), reduced over micro-batches and DP
(keys ending in `_max`: maxima; `DRIFT_BIN_KEYS`: the |drift| histogram, `rollout.refresh.drift`)."""


@dataclass
class LossSpec:
    """Everything the loss function needs besides the batch (built once per run)."""

    kind: str  # `loss.kind` (forward_kl | reverse_kl | jsd | top_k | sampled_token), or top_k_renorm
    beta: float
    temperature: float
    clip: float | None
    top_k: int | None
    vocab_size: int  # real (HF) vocabulary size; padded entries are ignored
    tp_group: object = None
    sampling: object = None  # SamplingConfig of the rollouts (drift logprobs); None: no drift
    chunk_tokens: int | None = None  # tokens per LM-head chunk; None: losses' default
    sequence_parallel: bool = False
    behaviour_cap: float | None = None  # loss.behaviour_correction=truncated: min(π_θ/μ, cap) per token

    @classmethod
    def from_config(cls, cfg, *, vocab_size: int, tp_group, sampling) -> LossSpec:
        """From an `OPSDConfig` (loss.* and rollout.temperature)."""
        lc = cfg.loss
        kind = "top_k_renorm" if lc.kind == "top_k" and not lc.top_k_tail else lc.kind  # no tail bucket
        return cls(
            kind=kind, beta=loss_beta(lc), temperature=lc.temperature or cfg.rollout.temperature,
            clip=loss_clip(lc),
            top_k=lc.top_k, vocab_size=vocab_size, tp_group=tp_group, sampling=sampling,
            chunk_tokens=lc.chunk_tokens, sequence_parallel=cfg.parallel.sequence_parallel,
            behaviour_cap=lc.behaviour_cap if lc.behaviour_correction == "truncated" else None,
        )  # fmt: skip


_CPU_CHUNK_BYTES = 1 << 25
"""CPU default of `loss.chunk_tokens`: 32 MiB per fp32 `[c, v/tp]` temporary of the eager loss math (it keeps
about ten of them per chunk), so the loss's peak stays a few hundred MiB whatever the vocabulary."""


def chunk_tokens(spec: LossSpec, weight: torch.Tensor) -> int | None:
    """Tokens per LM-head chunk: `spec.chunk_tokens`; else on CPU `_CPU_CHUNK_BYTES` per fp32 `[c, v/tp]`
    buffer (the same on every TP rank: Megatron's shards are equal); else None (the losses' CUDA default,
    ~1 GB of bf16 logits per chunk, sized for GEMM efficiency)."""
    if spec.chunk_tokens:
        return spec.chunk_tokens
    if weight.is_cuda:
        return None
    return max(64, _CPU_CHUNK_BYTES // (4 * max(weight.shape[0], 1)))


def run_schedule(
    step_fn, data: list, chunks: list, seq_length: int, micro_batch_size: int, forward_only: bool
):
    """Megatron's forward(-backward) schedule for this PP layout over `data` (one item per micro-batch)."""
    return get_forward_backward_func()(
        forward_step_func=step_fn, data_iterator=iter(data), model=chunks, num_microbatches=len(data),
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only,
    )  # fmt: skip


def _is_last_stage() -> bool:
    return mps.is_pipeline_last_stage()


def teacher_hidden(chunks: list, mbs: list[MicroBatch], *, micro_batch_size: int):
    """Teacher forward (call inside `teacher.forward_context()`): per micro-batch the final hidden states
    at the response positions `[b, R, h]` (model dtype) and the teacher's LM-head shard `[v/tp, h]`
    (detached) on the last stage; `([None] * M, None)` elsewhere. Collectives: those of the schedule; under
    context parallelism (micro-batches from `context_parallel.for_cp_rank`) one all-reduce SUM of each
    `[b, R, h]` over the CP group (each position is held by one CP rank)."""

    def step_fn(data_iterator, model):
        mb = next(data_iterator)
        out = hidden_states_forward(model, mb.teacher_tokens, mb.teacher_position_ids, None,
                                    lengths=mb.teacher_lengths)  # fmt: skip

        def keep(output):  # [b, T, h] on the last stage ([b, T / CP, h] under context parallelism)
            if mb.teacher_held is None:
                rows = gather_positions(output, mb.teacher_index)
            else:  # this CP rank's rows, zeros elsewhere (summed over CP below)
                rows = gather_held(output, mb.teacher_index, mb.teacher_held)
            return output.new_zeros(()), {"h": rows.detach()}

        return out, keep

    store = run_schedule(step_fn, mbs, chunks, mbs[0].teacher_tokens.shape[1], micro_batch_size, True)
    if not _is_last_stage():
        return [None] * len(mbs), None
    cp_group = mps.get_context_parallel_group() if mbs[0].teacher_held is not None else None
    # detach(): a tensor of its own, so an offloaded teacher moving its parameters away keeps this one
    return [sum_over_cp(d["h"], cp_group) for d in store], output_weight(chunks[-1]).detach()


def loss_func(mb: MicroBatch, t_hidden: torch.Tensor, t_weight: torch.Tensor, spec: LossSpec, scale: float,
              s_weight: torch.Tensor, capture: list | None, output: torch.Tensor):  # fmt: skip
    """Last-stage loss of one micro-batch from the student's final hidden states `[b, S, h]`.

    `capture`: when a list, this micro-batch's per-token losses `[b, R]` and loss mask are appended to it
    (`rollouts.jsonl` shows them).

    Returns (sum of per-token losses · scale, sums of `SUM_KEYS` for the metrics, float64 0-dim tensors).
    """
    h = output.shape[-1]
    # the head's dtype: a Float16Module-style wrapper would hand the last stage's output back in fp32
    hs = gather_positions(output, mb.student_index).reshape(-1, h).to(s_weight.dtype)  # [b·R, h]
    ht = t_hidden.reshape(-1, h).to(s_weight.dtype)  # [b·R, h]
    mask = mb.loss_mask.reshape(-1)  # [b·R]
    ids = mb.response_ids.reshape(-1)  # [b·R]
    per_tok, st = fused_linear_divergence(
        hs, s_weight, ht, t_weight.to(s_weight.dtype), kind=spec.kind, beta=spec.beta,
        temperature=spec.temperature, clip=spec.clip, loss_mask=mask, tp_group=spec.tp_group,
        top_k=spec.top_k, target_ids=ids, vocab_size=spec.vocab_size, chunk_size=chunk_tokens(spec, s_weight),
        reduce_hidden_grad=not spec.sequence_parallel, with_stats=True, sampling=spec.sampling,
    )  # fmt: skip
    if spec.behaviour_cap is not None and st.token_logprobs is not None:  # losses.behaviour
        per_tok = per_tok * truncated_weight(st.token_logprobs, mb.rollout_logprobs.reshape(-1),
                                             spec.behaviour_cap)  # fmt: skip
    loss_sum = per_tok.sum()
    if capture is not None:
        capture.append((per_tok.detach().reshape(mb.loss_mask.shape), mb.loss_mask))
    with torch.no_grad():
        keep = mask != 0
        sums = {"loss_sum": loss_sum.detach().double(), "tokens": keep.sum().double(),
                "clipped_fraction": st.clipped_fraction.double().sum(),
                "student_entropy": st.student_entropy.double().sum(),
                "teacher_entropy": st.teacher_entropy.double().sum()}  # fmt: skip
        if st.token_logprobs is not None:  # drift: the engine sampled with exactly these weights
            engine = mb.rollout_logprobs.reshape(-1).double()
            delta = torch.where(keep, (engine - st.token_logprobs.double()).abs().clamp(max=DRIFT_CLAMP), 0.0)
            sums["drift_abs"], sums["drift_mult"] = delta.sum(), torch.expm1(delta).sum()
            sums.update(zip(DRIFT_BIN_KEYS, drift_bins(delta, keep)))
            sums.update(offpolicy_sums(st.token_logprobs, mb.rollout_logprobs.reshape(-1), keep))
        else:
            for k in ("drift_abs", "drift_mult", "ratio_sum", "ratio_gt2", "ratio_max", *DRIFT_BIN_KEYS):
                sums[k] = torch.zeros((), dtype=torch.float64)
    return loss_sum * scale, sums


def student_forward_backward(
    chunks: list, mbs: list[MicroBatch], extras: list, loss_fn: Callable, keys: tuple[str, ...], *,
    micro_batch_size: int,
) -> dict[str, float]:  # fmt: skip
    """The student's forward + backward over all micro-batches (gradients accumulate in the chunks), for any
    loss: the last stage stops before the LM head and calls `loss_fn(mb, extra, hidden)` with the final
    hidden states [b, S, h] and this micro-batch's entry of `extras`, which returns (loss · scale, sums of
    `keys` as 0-dim tensors). Returns this rank's sums over the micro-batches (zeros off the last stage).
    Collectives: the schedule's and the loss's."""

    def step_fn(data_iterator, model):
        mb, extra = next(data_iterator)
        out = hidden_states_forward(model, mb.student_tokens, mb.student_position_ids, None,
                                    lengths=mb.student_lengths)  # fmt: skip
        return out, partial(loss_fn, mb, extra)

    data = list(zip(mbs, extras))
    store = run_schedule(step_fn, data, chunks, mbs[0].student_tokens.shape[1], micro_batch_size, False)
    sums = dict.fromkeys(keys, 0.0)
    for d in store if _is_last_stage() else []:
        for k in keys:
            sums[k] = max(sums[k], float(d[k])) if k.endswith("_max") else sums[k] + float(d[k])
    return sums


def student_step(
    chunks: list, mbs: list[MicroBatch], t_hidden: list, t_weight, spec: LossSpec, *, scale: float,
    micro_batch_size: int, capture: list | None = None,
) -> dict[str, float]:  # fmt: skip
    """OPSD's student forward + backward over all micro-batches (`student_forward_backward` with `loss_func`);
    returns this rank's `SUM_KEYS` sums (zeros off the last stage). `capture`: see `loss_func`."""
    s_weight = output_weight(chunks[-1]) if _is_last_stage() else None

    def loss(mb: MicroBatch, th: torch.Tensor, output: torch.Tensor):
        return loss_func(mb, th, t_weight, spec, scale, s_weight, capture, output)

    return student_forward_backward(chunks, mbs, t_hidden, loss, SUM_KEYS, micro_batch_size=micro_batch_size)


def step_metrics(sums: dict, rollout_stats: dict, n_samples: int, *, reporter: bool) -> dict[str, float]:
    """Global step metrics from this rank's loss sums and its replica's rollout stats (means over the
    replica's `n_samples` samples). Only `reporter` ranks (one per DP replica) contribute; collective:
    one all-reduce SUM over the world."""
    w = 1.0 if reporter else 0.0
    vec = {k: w * sums[k] for k in SUM_KEYS if not k.endswith("_max")}
    vec.update(pad=w * sums.get("pad_positions", 0.0), positions=w * sums.get("positions", 0.0))
    acc = rollout_stats["rollout/accuracy"]
    graded = w * n_samples if acc == acc else 0.0
    vec.update(acc_sum=graded * (acc if acc == acc else 0.0), acc_n=graded, samples=w * n_samples)
    for k in ("rollout/response_length", "rollout/truncation_rate"):
        vec[k] = w * n_samples * rollout_stats[k]
    g = reduce_sums(vec)
    top = torch.tensor(w * sums["ratio_max"], dtype=torch.float64)  # ratios are >= 0: 0 = no say
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    n = max(g["tokens"], 1.0)
    s = max(g["samples"], 1.0)
    return {
        "loss": g["loss_sum"] / n,
        "clipped_fraction": g["clipped_fraction"] / n,
        "entropy/student": g["student_entropy"] / n,
        "entropy/teacher": g["teacher_entropy"] / n,
        "response_tokens": g["tokens"],
        "rollout/accuracy": g["acc_sum"] / g["acc_n"] if g["acc_n"] > 0 else float("nan"),
        "rollout/response_length": g["rollout/response_length"] / s,
        "rollout/truncation_rate": g["rollout/truncation_rate"] / s,
        "drift/mean_abs_logprob": g["drift_abs"] / n,
        "drift/mult_prob_err": g["drift_mult"] / n,
        "drift/median_abs_logprob": bins_quantile([g[k] for k in DRIFT_BIN_KEYS]),  # the guard's
        "batch/padding_fraction": g["pad"] / max(g["positions"], 1.0),
        "offpolicy/ratio_mean": g["ratio_sum"] / n,  # π_θ/μ on sampled tokens (losses.behaviour)
        "offpolicy/ratio_max": float(top),
        "offpolicy/ratio_frac_gt2": g["ratio_gt2"] / n,
    }


class TeacherOutput(NamedTuple):
    """The teacher pass of one step, handed to the student pass."""

    hidden: list  # per micro-batch: final hidden states at response positions [b, R, h] (None off last stage)
    weight: torch.Tensor | None  # the teacher's LM-head shard [v/tp, h] (detached; None off the last stage)


class OPSDStep:
    """`algorithm: opsd` (the `step.protocol.Step` strategy): rollouts on the engines, pack, teacher forward,
    student forward + backward with the fused divergence, optimizer and schedule step, teacher update (EMA).

    `rollout`, `teacher_forward` and `forward_backward_step` are the phases `train` calls through `self`, so
    a test can wrap them on the instance (event order, injected failures)."""

    needs_engine = True

    def __init__(self, state: RunState):
        self.state = state
        self.loss_spec = LossSpec.from_config(
            state.cfg, vocab_size=state.info.vocab_size, tp_group=state.ps.tp_group,
            sampling=state.collector.sampling,
        )  # fmt: skip

    @staticmethod
    def make_teacher(cfg: OPSDConfig, chunks: list, build_fn: Callable[[], list]) -> Teacher:
        """The teacher of `teacher.mode`, made from the initial weights θ₀ before any checkpoint loads."""
        t = cfg.teacher
        return make_teacher(t.mode, chunks, build_fn, ema_decay=t.ema_decay, offload=t.offload)

    def samples(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        return self.rollout(step)

    def rollout(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """This replica's rollouts of `step` (`rollout.collect`); collective over the world."""
        return self.state.collector.collect(self.state.engine, step)

    def teacher_forward(self, mbs: list[MicroBatch]) -> TeacherOutput:
        """The teacher's hidden states at response positions and its LM-head shard (`teacher_hidden`)."""
        st = self.state
        with st.teacher.forward_context() as chunks:
            hidden, weight = teacher_hidden(chunks, [m.to(st.ps.device) for m in mbs],
                                            micro_batch_size=st.cfg.train.micro_batch_size)  # fmt: skip
        return TeacherOutput(hidden, weight)

    def forward_backward_step(self, mbs: list[MicroBatch], teacher: TeacherOutput, global_tokens: int,
                              capture: list | None = None) -> dict[str, float]:  # fmt: skip
        """Student forward + backward over all micro-batches, loss normalised by `global_tokens` (scale
        DP · M / G, see the module docstring); returns this rank's `SUM_KEYS` sums."""
        st = self.state
        return student_step(
            st.chunks, [m.to(st.ps.device) for m in mbs], teacher.hidden, teacher.weight, self.loss_spec,
            scale=st.dp * len(mbs) / max(global_tokens, 1), micro_batch_size=st.cfg.train.micro_batch_size,
            capture=capture,
        )  # fmt: skip

    def train(self, samples: list[Sample], *, capture: bool = False) -> StepOutput:
        st = self.state
        t0 = time.perf_counter()
        mbs = skip_first_tokens(pack(st, samples), st.cfg.loss.skip_first_tokens)
        g = global_tokens(st, mbs)
        padding = padding_fraction(mbs)
        full, mbs = mbs, for_cp_rank(mbs, st.ps.cp, st.ps.cp_rank)  # this CP rank's positions (parallel.cp)
        teacher = self.teacher_forward(mbs)
        t1 = time.perf_counter()
        zero_grads(st)
        capture = capture_over_cp(capture, st.ps.cp_group, st.ps.device)
        divergences = [] if capture else None
        sums = self.forward_backward_step(mbs, teacher, g, divergences)
        sums["pad_positions"], sums["positions"] = padding if st.ps.cp_rank == 0 else (0.0, 0.0)
        if divergences and st.ps.cp > 1:  # each CP rank has the positions it holds: summed, every position
            divergences = [
                (sum_over_cp(d * m, st.ps.cp_group), f.loss_mask) for (d, m), f in zip(divergences, full)
            ]
        if divergences:  # rollouts.jsonl pairs them with the samples in the step's order
            divergences = in_sample_order(divergences, mbs, st.cfg.train.micro_batch_size)
        ok, grad_norm = optimizer_step(st)
        st.teacher.after_optimizer_step()
        t2 = time.perf_counter()
        return StepOutput(
            sums, grad_norm, ok, {"time/teacher_s": t1 - t0, "time/train_s": t2 - t1}, divergences
        )

    def metrics(self, stats: dict[str, float], out: StepOutput) -> dict[str, float]:
        st = self.state
        reporter = st.ps.is_last_stage and st.ps.tp_rank == 0  # one rank per (data, context)-parallel rank
        # the loss sums of CP ranks are disjoint shares of the replica's; its samples are counted once
        n = st.cfg.train.global_batch_size // st.dp if st.ps.cp_rank == 0 else 0
        m = step_metrics(out.sums, stats, n, reporter=reporter)
        m["grad_norm"] = out.grad_norm
        return m
