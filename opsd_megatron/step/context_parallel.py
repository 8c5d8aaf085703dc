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
sequences put the same response token on different CP ranks.

    mb_r = split_microbatch(mb, cp=2, rank=r)    # what `step.opsd` runs on CP rank r (`for_cp_rank`)
      student/teacher tokens and position ids: [b, S / CP], [b, T / CP]; student_index: local positions;
      loss_mask: mask · held (num_tokens: this rank's share); teacher_index: local, teacher_held: held
    t_rows = sum_over_cp(gather_held(t_hidden_local, mb_r.teacher_index, mb_r.teacher_held), cp_group)

The attention over the split sequence is `mcore.models.cp_attention` (or TE's); the loss normalisation is
unchanged (G counted before the split); Megatron's schedule multiplies each CP rank's loss by CP and its DDP
averages gradients over DP x CP, so the gradient is that of Σ/G.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from opsd_megatron.mcore.models.cp_attention import cp_positions
from opsd_megatron.step.batch import MicroBatch


def cp_chunk(seq_len: int, cp: int) -> int:
    """c = S / (2·CP): the length of one of the 2·CP chunks (S must be a multiple of 2·CP)."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not a multiple of 2 x context-parallel size {cp}.")
    return seq_len // (2 * cp)


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


def split_microbatch(mb: MicroBatch, cp: int, rank: int) -> MicroBatch:
    """CP rank `rank`'s share of `mb` (see the module docstring); the sequence lengths must be multiples of
    2·CP (`batch.pack_for_step(cp=...)`)."""
    S, T = mb.student_tokens.shape[1], mb.teacher_tokens.shape[1]
    s_local, s_held = cp_local_index(mb.student_index, seq_len=S, cp=cp, rank=rank)
    t_local, t_held = cp_local_index(mb.teacher_index, seq_len=T, cp=cp, rank=rank)
    mask = mb.loss_mask * s_held.to(mb.loss_mask.dtype)
    return dataclasses.replace(
        mb, student_tokens=split_for_cp(mb.student_tokens, cp, rank),
        student_position_ids=split_for_cp(mb.student_position_ids, cp, rank),
        teacher_tokens=split_for_cp(mb.teacher_tokens, cp, rank),
        teacher_position_ids=split_for_cp(mb.teacher_position_ids, cp, rank),
        student_index=s_local, teacher_index=t_local, loss_mask=mask, num_tokens=int(mask.sum().item()),
        teacher_held=t_held,
    )  # fmt: skip


def for_cp_rank(mbs: list[MicroBatch], cp: int, rank: int) -> list[MicroBatch]:
    """`split_microbatch` of every micro-batch; `mbs` unchanged at CP 1."""
    return mbs if cp <= 1 else [split_microbatch(m, cp, rank) for m in mbs]


def sum_over_cp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce SUM of `x` over the CP group `group` (in place; returned). No-op for a group of one."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def capture_over_cp(capture: bool, group, device=None) -> bool:
    """True on every rank of the CP group `group` when any of them asks for the per-token divergences
    (rank 0 alone writes rollouts.jsonl; its CP peers must join the sum of their positions). One all-reduce
    MAX of one integer over CP; `capture` unchanged for a group of one."""
    if group is None or dist.get_world_size(group) == 1:
        return capture
    flag = torch.tensor([int(bool(capture))], device=device)  # on the group's device (NCCL: the GPU)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())
