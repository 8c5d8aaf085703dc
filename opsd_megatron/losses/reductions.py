"""Reduction of a per-position loss `[B, S]` (or any `[...]`) to the scalar that is back-propagated.

`token_mean`: sum over valid positions / a *global* count of valid tokens (over all micro-batches and
data-parallel ranks of the optimizer step, passed in). Summing the micro-batch losses then gives the step's
token mean; this is the OPSD reference's normalisation.
No collectives: the global count is the caller's (one all-reduce per step, outside the loss).
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
