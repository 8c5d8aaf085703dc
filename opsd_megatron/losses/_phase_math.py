"""The dense divergence of one chunk of logits in three fusable phases: the math, with no collective.

Each phase reads the raw logit shards `[c, v]` (input dtype, e.g. bf16) and recomputes log p from per-row
scalars (`shift` / `saved`), so it can run as one fused kernel: `_phases.py` dispatches these functions
(or their Triton twins in `triton_phases.py`, or a `torch.compile` of them) and adds the collectives;
`_rowblock.py` runs them on cache-sized row blocks on CPU. A leaf: imports only `_math` from this package.

    phase_stats        -> local (max, sum-exp) of student and teacher           `[2, 2, c]`
    phase_terms        -> partial loss and sum_v m_v h_v (+ metrics)            `[k, c]`
    phase_grad_        -> dloss/dlogits for the student shard, written into out `[c, v]`
    phase_terms_grad_  -> single rank: phase_terms and phase_grad_ in one pass   `[2, c]`, ls <- grad
"""

from __future__ import annotations

import torch

from opsd_megatron.losses._math import dense_terms


def _z(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32)) * inv_t  # (c, v) fp32 (fp64 kept)


def phase_stats(ls: torch.Tensor, lt: torch.Tensor, inv_t: float) -> torch.Tensor:
    """Local max and sum-exp relative to it, `[2 (student, teacher), 2 (max, sumexp), c]`."""
    out = []
    for x in (ls, lt):
        z = _z(x, inv_t)  # (c, v)
        m = z.amax(-1)  # (c,)
        out.append(torch.stack([m, torch.exp(z - m.unsqueeze(-1)).sum(-1)]))
    return torch.stack(out)


def phase_terms(ls, lt, shift, inv_t: float, kind: str, beta: float, clip, extra: bool) -> torch.Tensor:
    """Partial (this shard's) sums `[k, c]`: loss, sum_v m_v h_v (+ clipped count, H(p_S), H(p_T))."""
    logp_s = _z(ls, inv_t) - shift[0].unsqueeze(-1)  # (c, v)
    logp_t = _z(lt, inv_t) - shift[1].unsqueeze(-1)  # (c, v)
    f, h, p_s = dense_terms(logp_s, logp_t, kind, beta)
    parts = []
    if clip is not None:
        keep = f < clip
        f = f.clamp(max=clip)
        h = h * keep
    parts += [f.sum(-1), h.sum(-1)]
    if extra:
        clipped = (~keep).sum(-1).to(f.dtype) if clip is not None else torch.zeros_like(parts[0])
        parts += [clipped, -(p_s * logp_s).sum(-1), -(torch.exp(logp_t) * logp_t).sum(-1)]
    return torch.stack(parts)


def phase_grad_(ls, lt, saved, scale, inv_t: float, kind: str, beta: float, clip, out) -> None:
    """Write dloss/dlogits = scale * inv_t * (m h - p_S sum m h), scale `[c]`, into `out` `[c, v]`;
    `out` may be `ls` itself (the fused path: the gradient then needs no buffer of its own)."""
    logp_s = _z(ls, inv_t) - saved[0].unsqueeze(-1)  # (c, v)
    logp_t = _z(lt, inv_t) - saved[1].unsqueeze(-1)  # (c, v)
    f, h, p_s = dense_terms(logp_s, logp_t, kind, beta)
    if clip is not None:
        h = h * (f < clip)
    g = (h - p_s * saved[2].unsqueeze(-1)) * (scale * inv_t).unsqueeze(-1)
    out.copy_(g)


def phase_terms_grad_(ls, lt, shift, inv_t: float, kind: str, beta: float, clip) -> torch.Tensor:
    """Single-rank shortcut: `phase_terms` and `phase_grad_` in one call (the sums are already global)."""
    logp_s = _z(ls, inv_t) - shift[0].unsqueeze(-1)  # (c, v)
    logp_t = _z(lt, inv_t) - shift[1].unsqueeze(-1)  # (c, v)
    f, h, p_s = dense_terms(logp_s, logp_t, kind, beta)
    if clip is not None:
        keep = f < clip
        f = f.clamp(max=clip)
        h = h * keep
    parts = torch.stack([f.sum(-1), h.sum(-1)])  # (2, c)
    ls.copy_((h - p_s * parts[1].unsqueeze(-1)) * inv_t)
    return parts
