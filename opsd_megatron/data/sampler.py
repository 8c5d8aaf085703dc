"""Deterministic prompt order: the indices of step k are a pure function of (seed, k); resuming needs only k.

Epoch e is a permutation of range(n) seeded by (seed, e) (or the identity when `shuffle` is off); the stream
of epochs is cut into consecutive global batches. Each data-parallel replica takes a contiguous slice.
"""

from __future__ import annotations

import random


class PromptSampler:
    """Global batch of problem indices for optimizer step k (0-based)."""

    def __init__(self, num_problems: int, global_batch_size: int, seed: int, shuffle: bool = True) -> None:
        if num_problems < 1:
            raise ValueError("PromptSampler needs at least one problem.")
        self.n, self.gbs, self.seed, self.shuffle = num_problems, global_batch_size, seed, shuffle
        self._epochs: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._epochs:
            order = list(range(self.n))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + e).shuffle(order)
            self._epochs = {e: order}  # keep one epoch cached
        return self._epochs[e]

    def indices(self, step: int) -> list[int]:
        """The `global_batch_size` indices of `step` (wrapping across epochs)."""
        out = []
        for pos in range(step * self.gbs, (step + 1) * self.gbs):
            e, i = divmod(pos, self.n)
            out.append(self._epoch(e)[i])
        return out

    def epoch_of(self, step: int) -> float:
        """Fractional epoch reached at the end of `step`."""
        return (step + 1) * self.gbs / self.n

    def replica_slice(self, step: int, dp_rank: int, dp_size: int) -> list[int]:
        """This data-parallel replica's contiguous share of step `step`."""
        idx = self.indices(step)
        per = len(idx) // dp_size
        return idx[dp_rank * per : (dp_rank + 1) * per]
