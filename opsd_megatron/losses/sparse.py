"""Sparse divergence estimators on vocabulary-sharded logits: teacher top-k (+ tail bucket) and sampled token.

Both need the global log-probabilities of a few vocabulary entries per position. `_VocabParallelLogProbAt`
computes them for student and teacher at once (forward: MAX [2, N] + SUM [2, N] for the two log-softmaxes,
SUM [2, N, k] for the gathered values; backward: no collective) and the estimators are plain autograd on
those `[N, k]` values, which are identical on every TP rank, so rank r's shard gets the gradient of the one
loss (as in Megatron's `vocab_parallel_cross_entropy`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from opsd_megatron.losses._math import all_reduce, global_log_softmax_, group_size, scaled_fp32

_TINY = 1e-30  # floor of a tail-bucket probability before its log


class _VocabParallelLogProbAt(torch.autograd.Function):
    """Global log p_S, log p_T `[N, k]` at global vocabulary ids `[N, k]` from shards `[N, v/tp]`.

    The gradient flows to the student shard only: d log p_S(i) / d z_j = [j == i] - p_S(j), divided by the
    temperature; entries at or past `n_valid` (padding) get zero gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, ids, temperature, start, n_valid, group):
        z_s = scaled_fp32(student, n_valid, temperature)  # (N, v)
        z_t = scaled_fp32(teacher.detach(), n_valid, temperature)  # (N, v)
        (logp_s, logp_t), _ = global_log_softmax_([z_s, z_t], group)
        local = ids - start  # (N, k)
        inside = (local >= 0) & (local < n_valid)  # (N, k) this rank owns the id
        local = local.clamp(0, max(n_valid - 1, 0))
        if n_valid > 0:
            sel = torch.stack([logp_s.gather(1, local), logp_t.gather(1, local)]) * inside  # (2, N, k)
        else:
            sel = logp_s.new_zeros((2, *ids.shape))
        all_reduce(sel, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(logp_s, local, inside)
        ctx.meta = (temperature, n_valid, student.shape, student.dtype)
        out_s, out_t = sel[0].clone(), sel[1].clone()  # (N, k) each, not views of one buffer
        ctx.mark_non_differentiable(out_t)
        return out_s, out_t

    @staticmethod
    def backward(ctx, grad_s, _grad_t):
        logp_s, local, inside = ctx.saved_tensors
        temperature, n_valid, shape, dtype = ctx.meta
        grad = torch.exp(logp_s).mul_(-grad_s.sum(-1, keepdim=True))  # (N, v): -p_S(j) sum_i g_i
        if n_valid > 0:
            grad.scatter_add_(1, local, grad_s * inside)  # + g_i at j == id_i
        grad.mul_(1.0 / temperature)
        if n_valid < shape[-1]:
            grad = torch.nn.functional.pad(grad, (0, shape[-1] - n_valid))
        return grad.to(dtype).reshape(shape), None, None, None, None, None, None


def global_topk_ids(teacher, k: int, start: int, n_valid: int, group) -> torch.Tensor:
    """Global vocabulary ids `[N, k]` of the teacher's top-k logits across the TP group (same on every rank).

    Collective: one all-gather of the stacked local (value, id) candidates `[N, k, 2]` (fp32; ids < 2**24).
    """
    t = teacher.reshape(-1, teacher.shape[-1])[:, :n_valid].detach().float()  # (N, v)
    k_loc = min(k, n_valid)
    vals, idx = t.topk(k_loc, dim=-1) if k_loc > 0 else (t[:, :0], t[:, :0].long())
    if k_loc < k:  # pad so every rank sends the same shape
        vals = torch.nn.functional.pad(vals, (0, k - k_loc), value=-math.inf)
        idx = torch.nn.functional.pad(idx, (0, k - k_loc), value=0)
    cand = torch.stack([vals, (idx + start).float()], dim=-1)  # (N, k, 2)
    if group_size(group) > 1:
        parts = [torch.empty_like(cand) for _ in range(group_size(group))]
        dist.all_gather(parts, cand.contiguous(), group=group)
        cand = torch.cat(parts, dim=1)  # (N, tp*k, 2)
    top = cand[..., 0].topk(k, dim=-1).indices  # (N, k)
    return cand[..., 1].gather(1, top).long()


def topk_divergence(
    student, teacher, *, k, temperature, clip, start, n_valid, group, tail: bool = True
) -> torch.Tensor:
    """Forward KL over the teacher's global top-k entries plus one tail bucket holding the remaining mass.

    loss = sum_{i in top-k} p_T(i) log(p_T(i)/p_S(i)) + t_T log(t_T/t_S), t = 1 - sum_{top-k} p; each of
    the k+1 bucket terms is clamped at `clip` (pointwise, as the dense clip). Returns `[N]` fp32.
    `tail=False`: the OPSD reference's variant, forward KL between the two distributions restricted to the
    teacher's top-k ids and renormalised there (no tail bucket); each of the k terms clamped at `clip`.
    """
    ids = global_topk_ids(teacher, k, start, n_valid, group)  # (N, k)
    logp_s, logp_t = _VocabParallelLogProbAt.apply(student, teacher, ids, temperature, start, n_valid, group)
    if not tail:
        logq_s = logp_s - torch.logsumexp(logp_s, -1, keepdim=True)  # (N, k) renormalised over the top-k
        logq_t = logp_t - torch.logsumexp(logp_t, -1, keepdim=True)
        terms = logq_t.exp() * (logq_t - logq_s)  # (N, k)
        return (terms if clip is None else terms.clamp(max=clip)).sum(-1)
    p_t = logp_t.exp()  # (N, k)
    tail_t = (1.0 - p_t.sum(-1)).clamp(min=0.0)  # (N,)
    tail_s = (1.0 - logp_s.exp().sum(-1)).clamp(min=_TINY)  # (N,)
    terms = torch.cat(
        [p_t * (logp_t - logp_s), (tail_t * (tail_t.clamp(min=_TINY).log() - tail_s.log())).unsqueeze(-1)],
        dim=-1,
    )  # (N, k+1)
    if clip is not None:
        terms = terms.clamp(max=clip)
    return terms.sum(-1)


def sampled_token_divergence(student, teacher, target_ids, *, temperature, start, n_valid, group):
    """Sampled-token estimator: adv = stop-grad(log p_T(y) - log p_S(y)), loss = -adv * log p_S(y); `[N]`."""
    ids = target_ids.reshape(-1, 1).long()  # (N, 1)
    logp_s, logp_t = _VocabParallelLogProbAt.apply(student, teacher, ids, temperature, start, n_valid, group)
    adv = (logp_t - logp_s).detach()  # (N, 1)
    return (-adv * logp_s).squeeze(-1)
