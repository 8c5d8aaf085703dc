"""Off-policy statistics and the truncated importance weight of a per-token loss (rollouts made by older
weights: `rollout.max_staleness: 1`).

    stats = offpolicy_sums(trainer_lp, behaviour_lp, mask)   # {"ratio_sum", "ratio_gt2", "ratio_max"}
    per_tok = truncated_weight(trainer_lp, behaviour_lp, cap) * per_tok   # loss.behaviour_correction

ratio_i = π_θ(y_i | ·) / μ(y_i | ·) on sampled token i: the trainer's current probability over the
probability the engine sampled it with (both under the rollout's sampling distribution, so at staleness 0
the ratio is 1 up to the engine's numerics: the drift metric). The weight w_i = min(ratio_i, cap) is a
constant (no gradient flows through it): the loss Σ_i w_i ℓ_i has gradient Σ_i w_i ∇ℓ_i.
All tensors `[n]` (flattened response positions); float64 sums.
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 30.0
"""|log ratio| is clamped here before exp (a token the engine sampled at ~0 probability)."""


def log_ratio(trainer_lp: torch.Tensor, behaviour_lp: torch.Tensor) -> torch.Tensor:
    """log π_θ - log μ per token `[n]` (float64, detached, clamped to ±`LOG_RATIO_CLAMP`)."""
    d = trainer_lp.detach().double() - behaviour_lp.detach().double()
    return d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def offpolicy_sums(trainer_lp: torch.Tensor, behaviour_lp: torch.Tensor, mask: torch.Tensor) -> dict:
    """Sums over the masked tokens: ratio, count of ratio > 2, and the max ratio (0-dim float64 each)."""
    keep = mask.bool()
    ratio = torch.where(keep, log_ratio(trainer_lp, behaviour_lp).exp(), 0.0)
    top = ratio.max() if ratio.numel() else torch.zeros((), dtype=torch.float64)
    return {"ratio_sum": ratio.sum(), "ratio_gt2": (ratio > 2.0).sum().double(), "ratio_max": top}


def truncated_weight(trainer_lp: torch.Tensor, behaviour_lp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(π_θ/μ, cap) per token `[n]`, detached, in `trainer_lp`'s dtype (multiply the per-token loss)."""
    return log_ratio(trainer_lp, behaviour_lp).exp().clamp(max=cap).to(trainer_lp.dtype)
