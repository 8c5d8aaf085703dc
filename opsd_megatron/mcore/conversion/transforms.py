"""The named transforms between HF tensors and Megatron TP shards (see mapping.py for the table).

Expert transforms (`expert_fc1`, `expert_row`) take the expert-TP rank and size as `tp_rank`, `tp`.
Load direction: `hf_to_shard(transform, read, hf_names, spec, tp_rank, tp, padded_vocab)` builds this rank's
shard, calling `read(hf_name, dim, start, stop)` for exactly the rows/columns it needs (so a safetensors
reader can stream slices). Export direction: `shards_to_hf(transform, shards, spec, ...)` turns the list
of TP shards (rank order) into the full HF tensors. Both are pure functions (no collectives).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opsd_megatron.mcore.models.hf_config import ModelSpec

Reader = Callable[[str, int | None, int, int], torch.Tensor]  # (hf_name, dim or None=full, start, stop)


def hf_to_shard(
    transform: str,
    read: Reader,
    hf_names: tuple[str, ...],
    spec: ModelSpec,
    tp_rank: int,
    tp: int,
    padded_vocab: int,
) -> torch.Tensor:
    """This TP rank's Megatron shard of the parameter built from HF tensors."""
    if transform == "replicated":
        return read(hf_names[0], None, 0, 0)
    if transform in ("row", "expert_row"):  # split the input dimension (experts: over expert-TP)
        if transform == "expert_row":
            n = spec.moe_ffn_hidden_size
        else:
            n = spec.num_heads * spec.head_dim if "o_proj" in hf_names[0] else spec.ffn_hidden_size
        per = n // tp
        return read(hf_names[0], 1, tp_rank * per, (tp_rank + 1) * per)
    if transform == "vocab":  # rows of the padded vocabulary; padding rows are zero
        per = padded_vocab // tp
        start, stop = tp_rank * per, min((tp_rank + 1) * per, spec.vocab_size)
        if stop <= start:
            rows = read(hf_names[0], 0, 0, 0)[:0]
        else:
            rows = read(hf_names[0], 0, start, stop)
        if rows.shape[0] < per:
            pad = rows.new_zeros((per - rows.shape[0], *rows.shape[1:]))
            rows = torch.cat([rows, pad], dim=0)
        return rows
    if transform == "qkv":  # interleave [q_g; k_g; v_g] for each query group g of this rank
        hd, groups = spec.head_dim, spec.num_kv_heads
        heads_per_group = spec.num_heads // groups
        g0, g1 = tp_rank * groups // tp, (tp_rank + 1) * groups // tp
        q = read(hf_names[0], 0, g0 * heads_per_group * hd, g1 * heads_per_group * hd)
        k = read(hf_names[1], 0, g0 * hd, g1 * hd)
        v = read(hf_names[2], 0, g0 * hd, g1 * hd)
        tail = q.shape[1:]
        ng = g1 - g0
        qkv = torch.cat(
            [q.reshape(ng, heads_per_group * hd, *tail), k.reshape(ng, hd, *tail), v.reshape(ng, hd, *tail)],
            dim=1,
        )
        return qkv.reshape(-1, *tail)
    if transform in ("fc1", "expert_fc1"):  # [gate_r; up_r]: each SwiGLU half split over (expert-)TP
        per = (spec.moe_ffn_hidden_size if transform == "expert_fc1" else spec.ffn_hidden_size) // tp
        gate = read(hf_names[0], 0, tp_rank * per, (tp_rank + 1) * per)
        up = read(hf_names[1], 0, tp_rank * per, (tp_rank + 1) * per)
        return torch.cat([gate, up], dim=0)
    raise ValueError(f"unknown transform {transform!r}")


def shards_to_hf(transform: str, shards: list[torch.Tensor], spec: ModelSpec) -> list[torch.Tensor]:
    """Full HF tensors (in `hf_names` order) from the TP shards of one Megatron parameter (rank order)."""
    if transform == "replicated":
        return [shards[0]]
    if transform in ("row", "expert_row"):
        return [torch.cat(shards, dim=1)]
    if transform == "vocab":
        return [torch.cat(shards, dim=0)[: spec.vocab_size]]
    if transform == "qkv":
        hd, groups = spec.head_dim, spec.num_kv_heads
        heads_per_group = spec.num_heads // groups
        full = torch.cat(shards, dim=0)
        tail = full.shape[1:]
        grouped = full.reshape(groups, (heads_per_group + 2) * hd, *tail)
        q, k, v = torch.split(grouped, [heads_per_group * hd, hd, hd], dim=1)
        return [t.reshape(-1, *tail).contiguous() for t in (q, k, v)]
    if transform in ("fc1", "expert_fc1"):
        halves = [s.chunk(2, dim=0) for s in shards]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        return [gate, up]
    raise ValueError(f"unknown transform {transform!r}")
