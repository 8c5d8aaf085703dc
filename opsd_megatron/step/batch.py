"""Packing student and teacher sequences around one sampled response, with explicit position bookkeeping.

For a sample with student prompt P_s (length Ls), teacher prompt P_t (length Lt) and response r (length R):

    student sequence  = P_s ‖ r      (length Ls + R, contiguous: no padding between prompt and response)
    teacher sequence  = P_t ‖ r      (length Lt + R)

Causal LMs predict token i+1 from position i, so the next-token distribution for response token r_j lives at
`student_index[j] = Ls - 1 + j` in the student sequence and at `teacher_index[j] = Lt - 1 + j` in the
teacher's: the one-token shift is explicit, and the j-th entries of both index rows refer to the same sampled
token `response_ids[j]`. `loss_mask[j]` is 1 for every sampled token (the EOS included; truncated samples keep
all tokens) and 0 for the padding that makes rows of a micro-batch the same length. Sequences are padded at
the END only, which a causal model never sees: to one length per step, or, with `group_by_length`
(`train.group_by_length`), samples sorted by length into micro-batches each padded to its own longest
sequence (Megatron runs micro-batches of different lengths: the no-pipelining schedule takes any shape, and
pipeline p2p sends the shapes first with `config.variable_seq_lengths`).

    mb = pack_microbatch(samples, pad_id=0, student_len=64, teacher_len=96)
    mbs = pack_step(samples, micro_batch_size=2, pad_id=0, group_by_length=True)   # mb.sample_ids: order
    padding_fraction(mbs)                                  # padded share of the packed student+teacher tokens
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from opsd_megatron.rollout.base import Sample


@dataclass
class MicroBatch:
    """Tensors of one micro-batch; b = samples, S/T = padded student/teacher length, R = longest response."""

    student_tokens: torch.Tensor  # [b, S] int64
    student_position_ids: torch.Tensor  # [b, S] int64
    teacher_tokens: torch.Tensor  # [b, T] int64
    teacher_position_ids: torch.Tensor  # [b, T] int64
    student_index: torch.Tensor  # [b, R] int64: student position predicting response_ids[:, j]
    teacher_index: torch.Tensor  # [b, R] int64: teacher position predicting response_ids[:, j]
    response_ids: torch.Tensor  # [b, R] int64 (pad_id where masked)
    loss_mask: torch.Tensor  # [b, R] float32, 1 on sampled tokens (EOS included), 0 on padding
    rollout_logprobs: torch.Tensor  # [b, R] float32 (0 where unknown/masked)
    num_tokens: int  # loss_mask.sum()
    student_lengths: torch.Tensor | None = None  # [b] int64: unpadded student length (prompt + response)
    teacher_lengths: torch.Tensor | None = None  # [b] int64: unpadded teacher length
    sample_ids: list[int] | None = None  # indices of the rows in the step's sample list (None: in order)
    teacher_held: torch.Tensor | None = None  # [b, R] bool: context parallel, teacher_index local (held here)

    def to(self, device: torch.device | str) -> MicroBatch:
        kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**kw)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sequence_lengths(samples: Sequence[Sample]) -> tuple[int, int]:
    """Longest unpadded (student, teacher) sequence among `samples`."""
    s = max(len(x.student_prompt) + len(x.response) for x in samples)
    t = max(len(x.teacher_prompt) + len(x.response) for x in samples)
    return s, t


def pack_microbatch(
    samples: Sequence[Sample], *, pad_id: int, student_len: int | None = None, teacher_len: int | None = None
) -> MicroBatch:
    """Pack `samples` into one `MicroBatch`, right-padded to `student_len` / `teacher_len`."""
    if not samples:
        raise ValueError("pack_microbatch needs at least one sample.")
    need_s, need_t = sequence_lengths(samples)
    S = need_s if student_len is None else student_len
    T = need_t if teacher_len is None else teacher_len
    if need_s > S or need_t > T:
        raise ValueError(
            f"packed lengths ({S}, {T}) are shorter than the longest sequences ({need_s}, {need_t})."
        )
    b = len(samples)
    R = max(1, max(len(x.response) for x in samples))
    s_tok = torch.full((b, S), pad_id, dtype=torch.long)
    t_tok = torch.full((b, T), pad_id, dtype=torch.long)
    s_idx = torch.zeros((b, R), dtype=torch.long)
    t_idx = torch.zeros((b, R), dtype=torch.long)
    resp = torch.full((b, R), pad_id, dtype=torch.long)
    mask = torch.zeros((b, R), dtype=torch.float32)
    lps = torch.zeros((b, R), dtype=torch.float32)
    for i, x in enumerate(samples):
        ls, lt, n = len(x.student_prompt), len(x.teacher_prompt), len(x.response)
        if ls == 0 or lt == 0:
            raise ValueError(f"sample {i} has an empty student or teacher prompt.")
        r = torch.tensor(x.response, dtype=torch.long)
        s_tok[i, :ls] = torch.tensor(x.student_prompt, dtype=torch.long)
        s_tok[i, ls : ls + n] = r
        t_tok[i, :lt] = torch.tensor(x.teacher_prompt, dtype=torch.long)
        t_tok[i, lt : lt + n] = r
        j = torch.arange(R)
        # Masked slots point at the last real position (valid index, zero weight).
        s_idx[i] = torch.clamp(ls - 1 + j, max=ls + max(n, 1) - 2)
        t_idx[i] = torch.clamp(lt - 1 + j, max=lt + max(n, 1) - 2)
        resp[i, :n] = r
        mask[i, :n] = 1.0
        if x.rollout_logprobs:
            lps[i, :n] = torch.tensor(x.rollout_logprobs[:n], dtype=torch.float32)
    pos_s = torch.arange(S, dtype=torch.long).expand(b, S).contiguous()
    pos_t = torch.arange(T, dtype=torch.long).expand(b, T).contiguous()
    s_len = torch.tensor([len(x.student_prompt) + len(x.response) for x in samples], dtype=torch.long)
    t_len = torch.tensor([len(x.teacher_prompt) + len(x.response) for x in samples], dtype=torch.long)
    return MicroBatch(s_tok, pos_s, t_tok, pos_t, s_idx, t_idx, resp, mask, lps, int(mask.sum().item()),
                      s_len, t_len)  # fmt: skip


def length_order(samples: Sequence[Sample]) -> list[int]:
    """Sample indices, longest (student + teacher) sequence first; ties keep their order (stable)."""
    cost = [len(x.student_prompt) + len(x.teacher_prompt) + 2 * len(x.response) for x in samples]
    return sorted(range(len(samples)), key=lambda i: -cost[i])


def _uniform_lengths(lengths: list[tuple[int, int]], group: Any) -> list[tuple[int, int]]:
    """Element-wise MAX of the per-micro-batch (S, T) over `group` (collective: one all-reduce of 2·M ints;
    every rank has the same number M of micro-batches)."""
    t = torch.tensor([x for st in lengths for x in st], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [(int(t[2 * k]), int(t[2 * k + 1])) for k in range(len(lengths))]


def pack_step(
    samples: Sequence[Sample], *, micro_batch_size: int, pad_id: int, pad_to_multiple: int = 8,
    uniform_group: Any = None, group_by_length: bool = False,
) -> list[MicroBatch]:  # fmt: skip
    """Split a replica's samples into micro-batches.

    Default: in order, all sharing one (student, teacher) padded length (one shape for the whole
    forward_backward call). `group_by_length`: samples sorted longest first (`length_order`), each
    micro-batch padded to its own longest sequence (rounded to `pad_to_multiple`); `mb.sample_ids` say which
    samples it holds. The loss is normalised by the global token count either way, so grouping changes the
    gradient only by summation order. `uniform_group`: a process group over which every rank pads to the
    longest rank's lengths (per micro-batch when grouping; collective: one all-reduce MAX over it).
    """
    if len(samples) % micro_batch_size:
        raise ValueError(f"{len(samples)} samples are not divisible by micro_batch_size={micro_batch_size}.")
    order = length_order(samples) if group_by_length else list(range(len(samples)))
    groups = [order[k : k + micro_batch_size] for k in range(0, len(order), micro_batch_size)]
    if group_by_length:
        need = [sequence_lengths([samples[i] for i in g]) for g in groups]
    else:
        need = [sequence_lengths(samples)] * len(groups)
    lengths = [(round_up(s, pad_to_multiple), round_up(t, pad_to_multiple)) for s, t in need]
    if uniform_group is not None:
        lengths = _uniform_lengths(lengths, uniform_group)
    out = []
    for g, (S, T) in zip(groups, lengths):
        mb = pack_microbatch([samples[i] for i in g], pad_id=pad_id, student_len=S, teacher_len=T)
        mb.sample_ids = g if group_by_length else None
        out.append(mb)
    return out


def padding_fraction(mbs: Sequence[MicroBatch], *, teacher: bool = True) -> tuple[float, float]:
    """(padded positions, all positions) of the packed student (and, with `teacher`, teacher) sequences of
    `mbs`; the padded share is their ratio (`batch/padding_fraction`)."""
    total = sum(m.student_tokens.numel() + (m.teacher_tokens.numel() if teacher else 0) for m in mbs)
    real = sum(int(m.student_lengths.sum()) + (int(m.teacher_lengths.sum()) if teacher else 0) for m in mbs)
    return float(total - real), float(total)


def in_sample_order(rows: list, mbs: Sequence[MicroBatch], micro_batch_size: int) -> list:
    """Per-micro-batch `(per_token [b, R], mask [b, R])` pairs of length-grouped `mbs` back in the step's
    sample order, regrouped `micro_batch_size` rows at a time (R: the group's longest, zero-padded)."""
    if all(m.sample_ids is None for m in mbs):
        return rows
    by_id = {}
    for (d, mask), mb in zip(rows, mbs):
        for i, sid in enumerate(mb.sample_ids):
            by_id[sid] = (d[i], mask[i])
    out = []
    for k in range(0, len(by_id), micro_batch_size):
        part = [by_id[i] for i in range(k, min(k + micro_batch_size, len(by_id)))]
        R = max(d.shape[0] for d, _ in part)
        d = torch.stack([torch.nn.functional.pad(x, (0, R - x.shape[0])) for x, _ in part])
        m = torch.stack([torch.nn.functional.pad(x, (0, R - x.shape[0])) for _, x in part])
        out.append((d, m))
    return out


def pack_for_step(
    samples: Sequence[Sample], *, micro_batch_size: int, pad_id: int, pad_to_multiple: int = 8, tp: int = 1,
    sequence_parallel: bool = False, uniform_group: Any = None, group_by_length: bool = False, cp: int = 1,
) -> list[MicroBatch]:  # fmt: skip
    """The one packing of a training step (OPSD and SFT): `pack_step` (length-grouped with
    `group_by_length`) with lengths a multiple of
    lcm(`pad_to_multiple`, `tp`) under sequence parallelism (which splits the sequence over the TP ranks),
    and, with `uniform_group` (MoE at DP > 1: Megatron's token dispatch all-gathers hidden states over the
    expert-parallel ranks, which are data-parallel replicas, and needs equal token counts), one padded length
    over that group. `cp` > 1 (context parallelism): a multiple of 2·CP (·TP under sequence parallelism), the
    2·CP load-balanced chunks of `step.context_parallel`. Collective over `uniform_group` when given."""
    if sequence_parallel:
        pad_to_multiple = math.lcm(pad_to_multiple, tp)
    if cp > 1:
        pad_to_multiple = math.lcm(pad_to_multiple, 2 * cp * (tp if sequence_parallel else 1))
    return pack_step(samples, micro_batch_size=micro_batch_size, pad_id=pad_id,
                     pad_to_multiple=pad_to_multiple, uniform_group=uniform_group,
                     group_by_length=group_by_length)  # fmt: skip


def gather_positions(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """logits [b, s, v] (any sharding of v), index [b, R] -> [b, R, v]: rows at the given positions."""
    b, R = index.shape
    return torch.gather(logits, 1, index.unsqueeze(-1).expand(b, R, logits.shape[-1]))


def skip_first_tokens(mbs: list[MicroBatch], k: int) -> list[MicroBatch]:
    """Mask the first `k` response positions of every sample from the loss (`loss.skip_first_tokens`): the
    teacher prompt ends with thinking on, the student's with thinking off, so the teacher scores response
    position 0 expecting `<think>`. Updates `loss_mask` [b, R] and `num_tokens` in place; returns `mbs`."""
    if k <= 0:
        return mbs
    for mb in mbs:
        mb.loss_mask[:, :k] = 0.0
        mb.num_tokens = int(mb.loss_mask.sum().item())
    return mbs
