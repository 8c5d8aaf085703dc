"""Log-probabilities of given tokens under a rollout engine's sampling distribution, from sharded logits.

    lp = vocab_parallel_token_logprobs(logits, ids, sampling, vocab_size=hf_vocab, tp_group=tp)  # [b, s]

Reproduces the engines' logprob semantics (`opsd_megatron.rollout.sampling`, vLLM's
`logprobs_mode="processed_logprobs"`): log-softmax of logits / temperature after min-p, top-k and top-p
masking (raw logits when greedy), for logits whose vocabulary is split over tensor-parallel ranks and padded
beyond the real vocabulary. Used by the fused loss's step statistics (`step_stats.py`) and by the drift check
of the weight refresh (`rollout.refresh.drift`).
Collectives (forward only, under no_grad), over `tp_group`: all-reduce MAX (max logit), all-gather of each
rank's top-k candidates (only when top-k / top-p is on; the whole shard when top-p is on without top-k),
all-reduce SUM `[4, n]` (sum of exps, stacked with the target logit). Skipped when the group has one rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _tp_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def vocab_parallel_token_logprobs(
    vocab_parallel_logits: torch.Tensor,
    token_ids: torch.Tensor,
    sampling=None,
    *,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int | None = None,
) -> torch.Tensor:
    """Logprobs of `token_ids` under the engines' sampling distribution, from vocab-sharded logits (no grad).

    Args:
        vocab_parallel_logits: [..., v/tp] this rank's contiguous vocabulary shard (rank r holds global ids
            [r*v/tp, (r+1)*v/tp)), padded vocabulary included. Not modified.
        token_ids: [...] global token ids (the tokens sampled *at* these positions; shift beforehand).
        sampling: temperature / min-p / top-k / top-p as given to the engine (a rollout `SamplingConfig`, or
            any object with those four attributes); None = plain log-softmax.
        vocab_size: real vocabulary size; logits of padded ids >= vocab_size are excluded (engines drop them).
        tp_group: tensor-parallel group over which the vocabulary is split (None: not split).
        vocab_start_index: global id of this shard's first entry (default rank * v/tp); lets a caller pass
            only the real entries of a shard (e.g. the fused loss's logits chunk `[c, n_valid]`).
    Returns:
        [...] float32 logprobs (-inf where the token was masked out by top-k/top-p/min-p).
    """
    tp = _tp_size(tp_group)
    rank = dist.get_rank(tp_group) if tp > 1 else 0
    with torch.no_grad():
        lead = vocab_parallel_logits.shape[:-1]
        part = vocab_parallel_logits.shape[-1]
        if token_ids.shape != lead:
            raise ValueError(
                f"token_ids has shape {tuple(token_ids.shape)}, expected {tuple(lead)} "
                "(the logits' shape without the vocab dim)."
            )
        z = vocab_parallel_logits.reshape(-1, part).float()  # [n, v/tp] (copy below; input untouched)
        ids = token_ids.reshape(-1).long()  # [n]
        start = rank * part if vocab_start_index is None else int(vocab_start_index)
        temperature = 1.0 if sampling is None else sampling.temperature
        greedy = temperature < 1e-5
        z = z / (1.0 if greedy else temperature)  # [n, v/tp] new tensor
        if vocab_size is not None and start + part > vocab_size:
            z[:, max(vocab_size - start, 0) :] = -float("inf")  # padded vocabulary entries
        if not greedy and sampling is not None:
            z = mask_like_sampler(z, sampling, tp_group)
        zmax = z.max(dim=-1).values  # [n]
        if tp > 1:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=tp_group)
        zmax = torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))
        local = (ids >= start) & (ids < start + part)  # [n]
        local_idx = (ids - start).clamp(0, part - 1).unsqueeze(-1)  # [n, 1]
        target = torch.where(local, z.gather(-1, local_idx).squeeze(-1), torch.zeros_like(zmax))  # [n]
        target_hit = local.float()  # [n]; -inf targets would poison a SUM, so send finite parts separately
        target_finite = torch.where(torch.isfinite(target), target, torch.zeros_like(target))
        target_masked = (local & ~torch.isfinite(target)).float()
        stacked = torch.stack(
            [(z - zmax.unsqueeze(-1)).exp().sum(-1), target_finite, target_hit, target_masked]
        )  # [4, n]
        if tp > 1:
            dist.all_reduce(stacked, group=tp_group)
        sumexp, tgt, hit, masked = stacked
        lp = tgt - zmax - sumexp.log()  # [n]
        lp = torch.where((masked > 0) | (hit == 0), torch.full_like(lp, -float("inf")), lp)
        return lp.reshape(lead)


def mask_like_sampler(z: torch.Tensor, sampling, tp_group=None) -> torch.Tensor:
    """Apply min-p, top-k, top-p (vLLM order) to temperature-scaled shard logits z `[n, v/tp]`, out of place.

    Collectives over `tp_group` (none when it has one rank): all-reduce MAX `[n, 1]` (min-p only), all-gather
    of each rank's top-k candidates `[n, k]` (top-k / top-p only).
    """
    tp = _tp_size(tp_group)
    ninf = -float("inf")
    if sampling.min_p > 0:  # p < min_p * p_max  <=>  z < z_max + log(min_p)
        zmax = z.max(dim=-1, keepdim=True).values  # [n, 1]
        if tp > 1:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=tp_group)
        z = z.masked_fill(z < zmax + math.log(sampling.min_p), ninf)
    top_k = sampling.top_k if sampling.top_k and sampling.top_k > 0 else None
    top_p = sampling.top_p if sampling.top_p < 1.0 else None
    if top_k is None and top_p is None:
        return z
    part = z.shape[-1]
    kk = min(top_k, part) if top_k is not None else part
    cand = z.topk(kk, dim=-1).values  # [n, kk] this shard's best (descending)
    if tp > 1:
        gathered = [torch.empty_like(cand) for _ in range(tp)]
        dist.all_gather(gathered, cand.contiguous(), group=tp_group)
        cand = torch.cat(gathered, dim=-1)  # [n, tp*kk]
    cand = cand.sort(dim=-1, descending=True).values  # [n, c] global candidates, descending
    if top_k is not None and top_k < cand.shape[-1]:
        cand[:, top_k:] = ninf
    if top_p is not None:
        asc = cand.flip(-1)  # ascending, as vLLM
        cum = asc.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        cand = asc.masked_fill(drop, ninf).flip(-1)
    finite = torch.where(torch.isfinite(cand), cand, torch.full_like(cand, float("inf")))
    thresh = finite.min(dim=-1, keepdim=True).values  # [n, 1] smallest kept logit
    return z.masked_fill(z < thresh, ninf)
