"""Reductions of a per-position loss `[B, S]` (or any `[...]`) to the scalar that is back-propagated.

* `token_mean`: sum over valid positions / a *global* count of valid tokens (over all micro-batches and
  data-parallel ranks of the optimizer step, passed in). Summing the micro-batch losses then gives the
  step's token mean; this is the OPSD reference's normalisation.
* `sequence_mean`: the paper's per-sequence mean: mean over each sequence's valid tokens, then sum over
  sequences / a global sequence count (default: this batch's sequences with at least one valid token).
No collectives: the global counts are the caller's (one all-reduce per step, outside the loss).
"""

from __future__ import annotations

import torch


def token_mean(
    per_token_loss: torch.Tensor, loss_mask: torch.Tensor | None, num_valid_tokens: int | float | torch.Tensor
) -> torch.Tensor:
    """sum(loss * mask) / num_valid_tokens, a 0-dim tensor. `num_valid_tokens` is the global count (> 0)."""
    if isinstance(num_valid_tokens, (int, float)) and num_valid_tokens <= 0:
        raise ValueError(
            f"num_valid_tokens must be > 0 (the global valid-token count), got {num_valid_tokens}."
        )
    loss = per_token_loss if loss_mask is None else per_token_loss * (loss_mask != 0)
    return loss.sum() / num_valid_tokens


def sequence_mean(
    per_token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    num_sequences: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sequence mean over valid tokens (last dim = positions), summed over sequences / num_sequences.

    Args:
        per_token_loss: `[B, S]` (or `[..., S]`); loss_mask: same shape, nonzero = valid.
        num_sequences: global number of sequences to divide by; None = this batch's sequences that have
            at least one valid token. Sequences without valid tokens contribute 0.
    """
    if per_token_loss.shape != loss_mask.shape:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must have the per-token loss's shape "
            f"{tuple(per_token_loss.shape)}."
        )
    m = (loss_mask != 0).to(per_token_loss.dtype)  # (..., S)
    count = m.sum(-1)  # (...)
    per_seq = (per_token_loss * m).sum(-1) / count.clamp(min=1)  # (...)
    denom = (count > 0).sum() if num_sequences is None else num_sequences
    return per_seq.sum() / (denom.clamp(min=1) if isinstance(denom, torch.Tensor) else denom)
