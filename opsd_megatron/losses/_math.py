"""Stateless per-shard math and collectives for the vocabulary-parallel divergences.

Everything here works on one rank's vocabulary shard of already-flattened logits `[N, v]` (N positions,
v = this rank's valid vocabulary entries) in fp32, and on `[N]` per-position scalars. The only collectives
are the three forward all-reduces of `dense_forward` (MAX of the stacked maxima, SUM of the stacked
sum-exps, SUM of the stacked partial loss / gradient scalars); nothing here runs in backward.

Notation (per position, z = logits / temperature, the sum over v runs over the *global* vocabulary):
    log p(v) = z_v - lse,   f_v = per-vocabulary-entry term of the divergence,
    h_v      = p_S(v) * d f_v / d p_S(v)   (f_v depends on the student only through p_S(v)),
    m_v      = [f_v < clip]  (1 when there is no clip)
    loss     = sum_v min(f_v, clip),  dloss/dz^S_j = m_j h_j - p_S(j) * sum_v m_v h_v
which gives the formulas of docs/algorithm.md (forward KL: h = -p_T; reverse KL: h = p_S (log p_S/p_T + 1);
JSD(beta): h = (1-beta) p_S log(p_S/M)).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

DENSE_KINDS = ("forward_kl", "reverse_kl", "jsd")
ALL_KINDS = (*DENSE_KINDS, "top_k", "top_k_renorm", "sampled_token")
"""The config's `loss.kind` names; "top_k_renorm" is `loss.kind=top_k` with `loss.top_k_tail=false`."""
TOP_K_KINDS = ("top_k", "top_k_renorm")


def resolve_group(tp_group):
    """`None` -> the default (world) group if torch.distributed is initialised, else single-rank (None)."""
    if tp_group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return tp_group


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """In-place all-reduce over `group`, skipped when the group has one rank."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def effective_dense_kind(kind: str, beta: float) -> str:
    """JSD at beta = 0 is exactly forward KL, at beta = 1 exactly reverse KL (TRL GKD / OPSD convention)."""
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def global_log_softmax_(zs: list[torch.Tensor], group) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Turn each scaled-logit shard `[N, v]` (fp32, owned: modified in place) into global log-probs.

    Returns (the log-prob shards, shift `[len(zs), N]` = global log-sum-exp, so that log p = z - shift).
    Collectives: one all-reduce MAX of the stacked maxima `[len(zs), N]`, one all-reduce SUM of the stacked
    sum-exps `[len(zs), N]`. An empty shard (v = 0, all-padding rank) contributes -inf / 0.
    """
    n = zs[0].shape[0]
    mx = torch.stack([z.amax(-1) if z.shape[-1] > 0 else z.new_full((n,), -math.inf) for z in zs])  # (K, N)
    all_reduce(mx, dist.ReduceOp.MAX, group)
    for z, m in zip(zs, mx):
        z.sub_(m.unsqueeze(-1))  # (N, v)
    se = torch.stack([torch.exp(z).sum(-1) for z in zs])  # (K, N)
    all_reduce(se, dist.ReduceOp.SUM, group)
    lse = se.log_()  # (K, N), relative to mx
    for z, ls in zip(zs, lse):
        z.sub_(ls.unsqueeze(-1))  # (N, v) log-probs
    return zs, lse.add_(mx)


def dense_terms(logp_s: torch.Tensor, logp_t: torch.Tensor, kind: str, beta: float):
    """Per-entry term f `[N, v]`, its log-derivative h `[N, v]` and p_S `[N, v]` (all fp32, fresh tensors)."""
    p_s = torch.exp(logp_s)  # (N, v)
    if kind == "forward_kl":
        p_t = torch.exp(logp_t)
        f = (logp_t - logp_s).mul_(p_t)  # p_T (log p_T - log p_S)
        h = p_t.neg_()  # -p_T
    elif kind == "reverse_kl":
        d = logp_s - logp_t  # log p_S / p_T
        f = d * p_s
        h = d.add_(1.0).mul_(p_s)  # p_S (d + 1)
    elif kind == "jsd":
        log_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))  # (N, v) log M
        p_t = torch.exp(logp_t)
        d_s = logp_s - log_m  # log p_S / M
        f = (logp_t - log_m).mul_(p_t).mul_(beta)  # beta p_T log(p_T / M)
        h = d_s.mul_(p_s).mul_(1.0 - beta)  # (1-beta) p_S log(p_S / M)
        f.add_(h)
    else:  # pragma: no cover - validated by the public wrappers
        raise ValueError(f"unknown dense kind {kind!r}")
    return f, h, p_s


def dense_forward(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    *,
    kind: str,
    beta: float,
    clip: float | None,
    group,
    need_grad: bool,
):
    """Dense divergence on one vocabulary shard.

    Args:
        z_s, z_t: `[N, v]` fp32 scaled logits (logits / temperature), owned (overwritten in place).
    Returns:
        loss `[N]` (identical on all ranks); grad `[N, v]` fp32 = dloss/dz_s (None unless need_grad);
        saved `[3, N]` (student and teacher log-sum-exp, sum_v m_v h_v) when need_grad, else None.
    Collectives (forward only): MAX [2, N], SUM [2, N], SUM [k, N] with k = 1 + need_grad.
    """
    (logp_s, logp_t), shift = global_log_softmax_([z_s, z_t], group)
    f, h, p_s = dense_terms(logp_s, logp_t, kind, beta)
    parts = []
    if clip is not None:
        keep = f < clip  # (N, v) m_v
        f.clamp_(max=clip)
        h.mul_(keep)
    parts.append(f.sum(-1))
    if need_grad:
        parts.append(h.sum(-1))
    red = all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)  # (k, N)
    loss = red[0]
    grad = None
    if need_grad:
        grad = h.sub_(p_s.mul_(red[1].unsqueeze(-1)))  # (N, v): m_j h_j - p_S(j) sum_v m_v h_v
    saved = torch.cat([shift, red[1:2]]) if need_grad else None  # (3, N)
    return loss, grad, saved


def scaled_fp32(logits: torch.Tensor, n_valid: int, temperature: float, owned: bool = False) -> torch.Tensor:
    """`logits[..., :n_valid]` as a fresh `[N, n_valid]` tensor divided by the temperature, in fp32 (fp64 kept
    for fp64 inputs, which gradcheck uses). `owned=True`: the input may be overwritten (fresh GEMM output)."""
    x = logits.reshape(-1, logits.shape[-1])[:, :n_valid]
    if x.dtype in (torch.float32, torch.float64):
        return (
            x.mul_(1.0 / temperature) if owned and n_valid == logits.shape[-1] else x.mul(1.0 / temperature)
        )
    return x.float().mul_(1.0 / temperature)


def shard_layout(
    local_vocab: int, group, vocab_size: int | None, vocab_start_index: int | None
) -> tuple[int, int]:
    """(global start index of this shard, number of valid entries in it).

    Default layout (Megatron's): equal contiguous shards, rank r starts at r * local_vocab.
    `vocab_start_index` overrides the start (unequal shards); `vocab_size` (global number of real tokens)
    marks the entries at or past it as padding, which are ignored (probability 0, zero gradient).
    """
    start = group_rank(group) * local_vocab if vocab_start_index is None else int(vocab_start_index)
    n_valid = local_vocab
    if vocab_size is not None:
        n_valid = max(0, min(local_vocab, int(vocab_size) - start))
    return start, n_valid
