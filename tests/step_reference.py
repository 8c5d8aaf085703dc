"""Test helpers for the OPSD step (importable from spawned ranks): fixed rollouts, and the materialising
step that the trainer ran before the fused path (full `[b, T, v/tp]` logits from Megatron's output layer,
gathered at response positions, `vocab_parallel_divergence` + `divergence_metrics` +
`vocab_parallel_token_logprobs`), kept here only as the reference of the equivalence tests and benchmark.
"""

from __future__ import annotations

from functools import partial

import torch

from opsd_megatron.rollout.refresh.drift import DRIFT_BIN_KEYS, drift_bins
from opsd_megatron.step.batch import Sample, gather_positions
from opsd_megatron.step.opsd import SUM_KEYS, LossSpec, run_schedule


def fixed_samples(vocab: int, n: int = 4, seed: int = 0, resp=(5, 9), s_prompt=(4, 8), t_prompt=(9, 15)):
    """`n` rollouts of random token ids (ids in [3, vocab)) with varied lengths and fake engine logprobs."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo_hi):
        k = int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    out = []
    for _ in range(n):
        r = ids(resp)
        lps = (-torch.rand(len(r), generator=g) * 3).tolist()
        out.append(Sample(ids(s_prompt), ids(t_prompt), r, lps))
    return out


def old_teacher_logits(chunks: list, mbs: list, micro_batch_size: int) -> list:
    """Teacher logits at response positions `[b, R, v/tp]` per micro-batch (last stage; None elsewhere)."""
    from megatron.core import parallel_state as mps

    def step_fn(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb.teacher_tokens, mb.teacher_position_ids, None)

        def keep(output):  # [b, T, v/tp]
            return output.new_zeros(()), {"t": gather_positions(output, mb.teacher_index)}

        return out, keep

    store = run_schedule(step_fn, mbs, chunks, mbs[0].teacher_tokens.shape[1], micro_batch_size, True)
    return [d["t"] for d in store] if mps.is_pipeline_last_stage() else [None] * len(mbs)


def _old_loss(mb, t_logits, spec: LossSpec, scale: float, output):
    from loss_reference import divergence_metrics

    from opsd_megatron.losses import vocab_parallel_divergence
    from opsd_megatron.losses.token_logprobs import vocab_parallel_token_logprobs

    kw = dict(kind=spec.kind, beta=spec.beta, temperature=spec.temperature, clip=spec.clip,
              loss_mask=mb.loss_mask, tp_group=spec.tp_group, vocab_size=spec.vocab_size, top_k=spec.top_k,
              target_ids=mb.response_ids)  # fmt: skip
    student = gather_positions(output, mb.student_index)  # [b, R, v/tp]
    loss_sum = vocab_parallel_divergence(student, t_logits, **kw).sum()
    with torch.no_grad():
        m = divergence_metrics(student.detach(), t_logits, **kw)
        n = float(mb.loss_mask.sum())
        sums = {"loss_sum": loss_sum.detach().double(), "tokens": torch.tensor(n, dtype=torch.float64)}
        for k in ("clipped_fraction", "student_entropy", "teacher_entropy"):
            sums[k] = m[k].double() * n
        lp = vocab_parallel_token_logprobs(student.detach(), mb.response_ids, spec.sampling,
                                           vocab_size=spec.vocab_size, tp_group=spec.tp_group)  # fmt: skip
        delta = (mb.rollout_logprobs.double() - lp.double()).abs().clamp(max=30.0) * mb.loss_mask
        sums["drift_abs"], sums["drift_mult"] = delta.sum(), (torch.expm1(delta) * mb.loss_mask).sum()
        sums.update(zip(DRIFT_BIN_KEYS, drift_bins(delta, mb.loss_mask)))
        ratio = (lp.double() - mb.rollout_logprobs.double()).clamp(-30.0, 30.0).exp() * mb.loss_mask  # π_θ/μ
        sums["ratio_sum"], sums["ratio_gt2"], sums["ratio_max"] = (
            ratio.sum(),
            (ratio > 2).sum().double(),
            ratio.max(),
        )
    return loss_sum * scale, sums


def old_student_step(chunks, mbs, t_logits, spec: LossSpec, *, scale: float, micro_batch_size: int) -> dict:
    """The materialising student forward + backward; returns this rank's `SUM_KEYS` sums."""
    from megatron.core import parallel_state as mps

    def step_fn(data_iterator, model):
        mb, t = next(data_iterator)
        out = model(mb.student_tokens, mb.student_position_ids, None)  # [b, S, v/tp] on the last stage
        return out, partial(_old_loss, mb, t, spec, scale)

    store = run_schedule(step_fn, list(zip(mbs, t_logits)), chunks, mbs[0].student_tokens.shape[1],
                         micro_batch_size, False)  # fmt: skip
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    for d in store if mps.is_pipeline_last_stage() else []:
        for k in SUM_KEYS:
            sums[k] = max(sums[k], float(d[k])) if k.endswith("_max") else sums[k] + float(d[k])
    return sums
