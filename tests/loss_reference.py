"""Test reference: per-step diagnostics of the divergence on materialised logits, separate from the loss.

The training step gets these statistics from the fused loss's chunk loop (`losses.step_stats`,
`fused_linear_divergence(with_stats=True)`); this materialising version (formerly
`opsd_megatron.losses.metrics`) is kept only as the reference the tests compare that path with.

`divergence_metrics` returns 0-dim fp32 tensors, each a mean over this call's valid positions (weight them by
`num_tokens` to combine micro-batches or data-parallel ranks):
    divergence        mean per-position loss of `kind` (clip applied, as optimised)
    clipped_fraction  fraction of (position, vocabulary entry) terms clamped at `clip` (dense kinds; else 0)
    student_entropy   mean entropy of p_S in nats (after temperature)
    teacher_entropy   mean entropy of p_T in nats (after temperature)
    num_tokens        number of valid positions
Collectives: those of the loss (forward only), one more SUM of the valid vocabulary size per shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.losses import vocab_parallel_divergence
from opsd_megatron.losses._math import (
    DENSE_KINDS,
    all_reduce,
    dense_terms,
    effective_dense_kind,
    global_log_softmax_,
    resolve_group,
    scaled_fp32,
    shard_layout,
)


def _dense_stats(z_s, z_t, kind: str, beta: float, clip, group):
    """Per-position loss (clip applied), clipped-entry count, H(p_S), H(p_T), each `[N]`, from scaled logit
    shards `[N, v]` (owned). Collectives: those of `global_log_softmax_`, one all-reduce SUM `[4, N]`."""
    (logp_s, logp_t), _ = global_log_softmax_([z_s, z_t], group)
    f, _, p_s = dense_terms(logp_s, logp_t, kind, beta)  # (N, v) each
    clipped = (f >= clip).sum(-1).to(f.dtype) if clip is not None else f.new_zeros(f.shape[0])
    loss = (f if clip is None else f.clamp(max=clip)).sum(-1)
    ent_s = -(p_s * logp_s).sum(-1)
    ent_t = -(torch.exp(logp_t) * logp_t).sum(-1)
    return all_reduce(torch.stack([loss, clipped, ent_s, ent_t]), dist.ReduceOp.SUM, group)  # (4, N)


@torch.no_grad()
def divergence_metrics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    clip: float | None = None,
    loss_mask: torch.Tensor | None = None,
    tp_group=None,
    top_k: int | None = None,
    target_ids: torch.Tensor | None = None,
    vocab_size: int | None = None,
    vocab_start_index: int | None = None,
) -> dict[str, torch.Tensor]:
    """Diagnostics dict (see module docstring) for logits `[..., v/tp]`; same arguments as the loss."""
    group = resolve_group(tp_group)
    local_vocab = student_logits.shape[-1]
    _, n_valid = shard_layout(local_vocab, group, vocab_size, vocab_start_index)
    mask = (
        torch.ones(student_logits.shape[:-1], device=student_logits.device)
        if loss_mask is None
        else (loss_mask != 0).float()
    ).reshape(-1)  # (N,)
    n_tok = mask.sum()
    denom = n_tok.clamp(min=1)
    beta_f = 0.0 if beta is None else float(beta)
    dense_kind = effective_dense_kind(kind, beta_f) if kind in DENSE_KINDS else "forward_kl"
    z_s = scaled_fp32(student_logits.detach(), n_valid, temperature)  # (N, v)
    z_t = scaled_fp32(teacher_logits.detach(), n_valid, temperature)  # (N, v)
    loss, clipped, ent_s, ent_t = _dense_stats(
        z_s, z_t, dense_kind, beta_f, None if clip is None else float(clip), group
    )  # (N,) each
    if kind not in DENSE_KINDS:
        loss = vocab_parallel_divergence(
            student_logits.detach(), teacher_logits.detach(), kind=kind, beta=beta, temperature=temperature,
            clip=clip, loss_mask=loss_mask, tp_group=group, top_k=top_k, target_ids=target_ids,
            vocab_size=vocab_size, vocab_start_index=vocab_start_index,
        ).reshape(-1)  # fmt: skip
        clipped = torch.zeros_like(clipped)
    v_global = all_reduce(torch.tensor(float(n_valid), device=mask.device), dist.ReduceOp.SUM, group)
    return {
        "divergence": (loss * mask).sum() / denom,
        "clipped_fraction": (clipped * mask).sum() / (denom * v_global),
        "student_entropy": (ent_s * mask).sum() / denom,
        "teacher_entropy": (ent_t * mask).sum() / denom,
        "num_tokens": n_tok,
    }


def topk_reference_terms(ls: torch.Tensor, lt: torch.Tensor, idx: torch.Tensor, *, tail: bool, beta: float):
    """float64 per-bucket terms `[..., B]` of the top-k divergence from full-vocabulary log-probs `[..., V]`
    (any dtype; computed in float64) at the teacher's top-k ids `idx` `[..., k]`, written from the
    definitions: tail=True: B = k + 1 buckets, the k entries and the mass outside them (the sum of the
    outside probabilities, not 1 - sum); tail=False: B = k, both distributions restricted to the k entries and
    renormalised. beta = 0: forward KL p_T log(p_T/p_S); beta = 1: reverse KL; else JSD(beta) with
    M = beta p_T + (1-beta) p_S: beta p_T log(p_T/M) + (1-beta) p_S log(p_S/M)."""
    ps_full, pt_full = ls.double().exp(), lt.double().exp()
    ps, pt = ps_full.gather(-1, idx), pt_full.gather(-1, idx)  # (..., k)
    if tail:
        outside = torch.ones_like(ps_full, dtype=torch.bool).scatter(-1, idx, False)
        ps = torch.cat([ps, (ps_full * outside).sum(-1, keepdim=True)], -1)  # (..., k+1)
        pt = torch.cat([pt, (pt_full * outside).sum(-1, keepdim=True)], -1)
    else:
        ps, pt = ps / ps.sum(-1, keepdim=True), pt / pt.sum(-1, keepdim=True)
    if beta == 0.0:
        return pt * torch.log(pt / ps)
    if beta == 1.0:
        return ps * torch.log(ps / pt)
    m = beta * pt + (1 - beta) * ps
    return beta * pt * torch.log(pt / m) + (1 - beta) * ps * torch.log(ps / m)
