"""Sparse divergence estimators on vocabulary-sharded logits: teacher top-k (+ tail bucket; forward KL or
JSD(beta)) and sampled token.

Both need the global log-probabilities of a few vocabulary entries per position. `_VocabParallelLogProbAt`
computes them for student and teacher at once (forward: MAX [2, N] + SUM [2, N] for the two log-softmaxes,
SUM [2, N, k] for the gathered values; with the top-k tail bucket also the log-mass outside the top-k as a
log-sum-exp: one more MAX [2, N], its sums riding on the same SUM [2, N, k+1]; backward: no collective) and
the estimators are plain autograd on those `[N, k(+1)]` values, which are identical on every TP rank, so rank
r's shard gets the gradient of the one loss (as in Megatron's `vocab_parallel_cross_entropy`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from opsd_megatron.losses._math import all_reduce, global_log_softmax_, group_size, scaled_fp32


class _VocabParallelLogProbAt(torch.autograd.Function):
    """Global log p_S, log p_T `[N, k]` at global vocabulary ids `[N, k]` from shards `[N, v/tp]`; with
    `tail=True` one more column `[N, k+1]`: the log of the mass outside those ids, a log-sum-exp over the
    entries outside the top-k (exact however close the top-k mass is to 1; not 1 - sum p). The ids of a row
    must be distinct.

    The gradient flows to the student shard only: d log p_S(i) / d z_j = [j == i] - p_S(j) and
    d log tail_S / d z_j = [j outside] p_S(j) / tail_S - p_S(j), divided by the temperature; entries at or
    past `n_valid` (padding) get zero gradient. Collectives (forward): MAX [2, N] + SUM [2, N] (the two
    log-softmaxes), with the tail MAX [2, N] (the outside entries' maxima), then one SUM [2, N, k(+1)].
    """

    @staticmethod
    def forward(ctx, student, teacher, ids, temperature, start, n_valid, group, tail=False):
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
        outside = None
        if tail:
            hits = torch.zeros_like(logp_s, dtype=torch.int32)  # (N, v) (scatter_add: clamped ids collide)
            if n_valid > 0:
                hits.scatter_add_(1, local, inside.to(torch.int32))
            outside = hits == 0  # (N, v) entries outside the top-k
            se, tail_max = _outside_sumexp(logp_s, logp_t, outside, group)  # (2, N, 1), (2, N)
            sel = torch.cat([sel, se], dim=-1)  # (2, N, k+1)
        all_reduce(sel, dist.ReduceOp.SUM, group)
        if tail:
            sel[..., -1] = sel[..., -1].log() + tail_max  # (2, N) log tail mass (-inf when empty)
        ctx.save_for_backward(logp_s, local, inside, *(() if outside is None else (outside, sel[0, :, -1])))
        ctx.meta = (temperature, n_valid, student.shape, student.dtype, tail)
        out_s, out_t = sel[0].clone(), sel[1].clone()  # (N, k(+1)) each, not views of one buffer
        ctx.mark_non_differentiable(out_t)
        return out_s, out_t

    @staticmethod
    def backward(ctx, grad_s, _grad_t):
        logp_s, local, inside, *rest = ctx.saved_tensors
        temperature, n_valid, shape, dtype, tail = ctx.meta
        grad = torch.exp(logp_s).mul_(-grad_s.sum(-1, keepdim=True))  # (N, v): -p_S(j) sum_i g_i
        g_ids = grad_s[:, :-1] if tail else grad_s  # (N, k)
        if tail:
            outside, log_tail_s = rest
            g_tail = grad_s[:, -1:]  # (N, 1)
            ok = torch.isfinite(log_tail_s).unsqueeze(-1)  # an empty tail has no gradient
            share = (
                torch.exp(logp_s - torch.where(ok, log_tail_s.unsqueeze(-1), 0.0)) * outside * ok
            )  # (N, v)
            grad.add_(share * g_tail)  # + g_tail p_S(j) / tail_S outside the top-k
        if n_valid > 0:
            grad.scatter_add_(1, local, g_ids * inside)  # + g_i at j == id_i
        grad.mul_(1.0 / temperature)
        if n_valid < shape[-1]:
            grad = torch.nn.functional.pad(grad, (0, shape[-1] - n_valid))
        return grad.to(dtype).reshape(shape), None, None, None, None, None, None, None


def _outside_sumexp(logp_s, logp_t, outside, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(this shard's sum of exp(log p - M) over the entries outside the top-k `[2, N, 1]`, M `[2, N]`): M is
    the global maximum of those log-probs (collective: all-reduce MAX `[2, N]`; 0 where the tail is empty),
    so the caller's SUM over the ranks and log give log tail = M + log sum, with no cancellation."""
    lp = torch.stack([logp_s, logp_t]).masked_fill(~outside, -math.inf)  # (2, N, v)
    mx = lp.amax(-1) if lp.shape[-1] > 0 else lp.new_full(lp.shape[:2], -math.inf)  # (2, N)
    all_reduce(mx, dist.ReduceOp.MAX, group)
    safe = torch.where(torch.isfinite(mx), mx, 0.0)  # an empty tail: sum 0, log -inf
    return torch.exp(lp - safe.unsqueeze(-1)).sum(-1, keepdim=True), safe  # (2, N, 1), (2, N)


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


def bucket_terms(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-bucket terms `[N, B]` of the divergence between two distributions given by their log-probs over
    the same B buckets: forward KL p_T log(p_T/p_S) (beta = 0), reverse KL p_S log(p_S/p_T) (beta = 1), else
    JSD(beta) beta p_T log(p_T/M) + (1-beta) p_S log(p_S/M), M = beta p_T + (1-beta) p_S. A bucket empty
    under both (log p = -inf: an empty tail) contributes 0."""
    empty = torch.isneginf(logp_s) & torch.isneginf(logp_t)  # (N, B)
    ls, lt = logp_s.masked_fill(empty, 0.0), logp_t.masked_fill(empty, 0.0)
    if beta == 0.0:
        terms = lt.exp() * (lt - ls)
    elif beta == 1.0:
        terms = ls.exp() * (ls - lt)
    else:
        log_m = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))  # (N, B)
        terms = beta * lt.exp() * (lt - log_m) + (1.0 - beta) * ls.exp() * (ls - log_m)
    return terms.masked_fill(empty, 0.0)


def topk_divergence(
    student, teacher, *, k, temperature, clip, start, n_valid, group, tail: bool = True, beta: float = 0.0
) -> torch.Tensor:
    """A divergence over the teacher's global top-k entries: `bucket_terms(beta)` (forward KL at beta = 0,
    JSD(beta) otherwise) over k+1 buckets, the top-k entries plus one tail bucket holding the remaining mass
    (log tail = a log-sum-exp over the entries outside the top-k). Each bucket term is clamped at `clip`
    (pointwise, as the dense clip). Returns `[N]` fp32.
    `tail=False`: the OPSD reference's variant, both distributions restricted to the teacher's top-k ids and
    renormalised there (no tail bucket); its top-k script runs JSD(beta = 0.5) over these k buckets.
    """
    ids = global_topk_ids(teacher, k, start, n_valid, group)  # (N, k)
    logp_s, logp_t = _VocabParallelLogProbAt.apply(
        student, teacher, ids, temperature, start, n_valid, group, tail
    )  # (N, k+1) with the tail, else (N, k)
    if not tail:
        logp_s = logp_s - torch.logsumexp(logp_s, -1, keepdim=True)  # (N, k) renormalised over the top-k
        logp_t = logp_t - torch.logsumexp(logp_t, -1, keepdim=True)
    terms = bucket_terms(logp_s, logp_t, float(beta))  # (N, B)
    return (terms if clip is None else terms.clamp(max=clip)).sum(-1)


def sampled_token_divergence(student, teacher, target_ids, *, temperature, start, n_valid, group):
    """Sampled-token estimator: adv = stop-grad(log p_T(y) - log p_S(y)), loss = -adv * log p_S(y); `[N]`."""
    ids = target_ids.reshape(-1, 1).long()  # (N, 1)
    logp_s, logp_t = _VocabParallelLogProbAt.apply(student, teacher, ids, temperature, start, n_valid, group)
    adv = (logp_t - logp_s).detach()  # (N, 1)
    return (-adv * logp_s).squeeze(-1)
