"""Response positions under Megatron's load-balanced context parallelism (`parallel.cp`), index math only.

Megatron splits a sequence of length S (a multiple of 2·CP) into 2·CP chunks of c = S / (2·CP) positions; CP
rank i holds chunks i and 2·CP−1−i, in that order (`megatron.core.utils.get_batch_on_this_cp_rank`), so its
local sequence is S / CP long: local position l < c is global i·c + l, local c + l is global
(2·CP−1−i)·c + l. The packing's index rows (`MicroBatch.student_index` / `teacher_index`, global positions
[b, R]) are mapped to (local position, held) per rank: every global position is held by exactly one rank.

    local, held = cp_local_index(mb.student_index, seq_len=S, cp=2, rank=r)     # [b, R] int64, [b, R] bool
    tokens_r = split_for_cp(mb.student_tokens, cp=2, rank=r)                    # [b, S / CP]
    rows = gather_held(hidden_local, local, held)                               # [b, R, h], 0 where not held

The student's loss on a CP rank covers the response positions it holds (loss mask · held); the teacher's
hidden states at response positions are the sum over the CP group of every rank's `gather_held` (each
position held once: an all-reduce SUM gives every rank the full [b, R, h]), because the student and teacher
sequences put the same response token on different CP ranks. Wiring this into the step (CP process groups,
TE's context-parallel attention) needs Transformer Engine: see `config` key `parallel.cp`.
"""

from __future__ import annotations

import torch


def cp_chunk(seq_len: int, cp: int) -> int:
    """c = S / (2·CP): the length of one of the 2·CP chunks (S must be a multiple of 2·CP)."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not a multiple of 2 x context-parallel size {cp}.")
    return seq_len // (2 * cp)


def cp_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """[S / CP] int64: the global positions CP rank `rank` holds, in its local order."""
    c = cp_chunk(seq_len, cp)
    lo = torch.arange(rank * c, (rank + 1) * c)
    hi = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)
    return torch.cat([lo, hi])


def split_for_cp(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """`x` [..., S, ...] (sequence at `dim`) -> this rank's [..., S / CP, ...] (its chunks i, 2·CP−1−i)."""
    return x.index_select(dim, cp_positions(x.shape[dim], cp, rank).to(x.device))


def cp_local_index(
    index: torch.Tensor, *, seq_len: int, cp: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global positions `index` [b, R] -> (local position [b, R] int64 (0 where not held), held [b, R] bool)
    on CP rank `rank`."""
    c = cp_chunk(seq_len, cp)
    chunk, offset = index // c, index % c
    first, second = chunk == rank, chunk == 2 * cp - 1 - rank
    local = torch.where(first, offset, torch.where(second, c + offset, torch.zeros_like(index)))
    return local, first | second


def gather_held(hidden: torch.Tensor, local: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """hidden [b, S / CP, h] (this rank's local sequence), local / held [b, R] -> [b, R, h]: the rows this
    rank holds, zeros elsewhere (differentiable; summed over the CP group it is the plain gather)."""
    b, R = local.shape
    rows = torch.gather(hidden, 1, local.unsqueeze(-1).expand(b, R, hidden.shape[-1]))
    return rows * held.unsqueeze(-1).to(rows.dtype)
