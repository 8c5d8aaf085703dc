"""Which slabs of which HF tensors a Megatron shard holds: `Piece`s, for a shard-exact weight refresh.

    pieces = shard_pieces("qkv", hf_names, spec, rank=1, size=2, local_rows=192)
    # [Piece("...q_proj.weight", 0, 128, 192, (256, 64)), Piece("...k_proj.weight", 0, 64, 96, ...), ...]

A Megatron TP shard (and a rollout engine's TP shard, `opsd_megatron.rollout.refresh.vllm_layout`) is, in
memory, the concatenation of *slabs*: a range [start, stop) of one HF tensor along one dimension (0 or 1),
full along the others, laid out contiguously (row-major, the slab's own shape). Padding rows of a vocabulary
shard are a slab of `hf_name=None` (zeros on the engine side, ignored on the Megatron side). So both sides
can be described by lists of pieces, and moving weights from one layout to the other is intersecting pieces
of the same HF tensor along the same dimension (`opsd_megatron.rollout.refresh.plan`). Pure functions, no
collectives; `local_holdings(chunks)` lists this rank's exported parameters with their pieces.

Order of pieces inside a shard, by transform (mapping.py's table):
    replicated  the full tensor (dim 0)              row / expert_row  columns [r*n/t, (r+1)*n/t) (dim 1)
    vocab       rows of the padded vocabulary, then padding rows
    qkv         for each query group g of the rank: q rows of g, k rows of g, v rows of g
    fc1 / expert_fc1   gate rows of the rank, then up rows of the rank
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as mps

from opsd_megatron.mcore.conversion.mapping import EXPERT_TRANSFORMS, TP_DIM, hf_shape, param_maps
from opsd_megatron.mcore.models.builder import model_info, unwrap
from opsd_megatron.mcore.models.hf_config import ModelSpec


@dataclass(frozen=True)
class Piece:
    """Slab [start, stop) along `dim` of the HF tensor `hf_name` (full shape `shape`); `hf_name=None`:
    padding (zeros) of shape `shape` with [start, stop) its rows."""

    hf_name: str | None
    dim: int
    start: int
    stop: int
    shape: tuple[int, ...]

    @property
    def slab_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        s[self.dim] = self.stop - self.start
        return tuple(s)

    @property
    def numel(self) -> int:
        return math.prod(self.slab_shape)


def full_piece(hf_name: str, shape: tuple[int, ...]) -> Piece:
    return Piece(hf_name, 0, 0, shape[0], shape)


def range_piece(hf_name: str, shape: tuple[int, ...], dim: int, rank: int, size: int) -> Piece:
    """The `rank`-th of `size` equal slabs along `dim`."""
    per = shape[dim] // size
    return Piece(hf_name, dim, rank * per, (rank + 1) * per, shape)


def vocab_pieces(hf_name: str, shape: tuple[int, ...], rank: int, per: int) -> list[Piece]:
    """Rows [rank*per, (rank+1)*per) of a vocabulary padded past `shape[0]` rows (padding last)."""
    start, stop = rank * per, min((rank + 1) * per, shape[0])
    out = [Piece(hf_name, 0, start, stop, shape)] if stop > start else []
    pad = per - max(stop - start, 0)
    if pad:
        out.append(Piece(None, 0, 0, pad, (pad, *shape[1:])))
    return out


def shard_pieces(
    transform: str, hf_names: tuple[str, ...], spec: ModelSpec, rank: int, size: int, local_rows: int
) -> list[Piece]:
    """Pieces of a Megatron shard (rank `rank` of `size` of its (expert-)TP group), in memory order."""
    shapes = [hf_shape(n, spec) for n in hf_names]
    if transform == "replicated":
        return [full_piece(hf_names[0], shapes[0])]
    if transform in ("row", "expert_row"):
        return [range_piece(hf_names[0], shapes[0], 1, rank, size)]
    if transform == "vocab":
        return vocab_pieces(hf_names[0], shapes[0], rank, local_rows)
    if transform in ("fc1", "expert_fc1"):
        return [range_piece(n, s, 0, rank, size) for n, s in zip(hf_names, shapes)]
    if transform == "qkv":
        hd, groups = spec.head_dim, spec.num_kv_heads
        hpg = spec.num_heads // groups
        out = []
        for g in range(rank * groups // size, (rank + 1) * groups // size):
            out.append(Piece(hf_names[0], 0, g * hpg * hd, (g + 1) * hpg * hd, shapes[0]))
            out.append(Piece(hf_names[1], 0, g * hd, (g + 1) * hd, shapes[1]))
            out.append(Piece(hf_names[2], 0, g * hd, (g + 1) * hd, shapes[2]))
        return out
    raise ValueError(f"unknown transform {transform!r}")


@dataclass(frozen=True)
class Holding:
    """One exported Megatron parameter of one rank: its key (the global Megatron name), pieces, dtype."""

    key: str
    pieces: tuple[Piece, ...]
    dtype: str


def local_holdings(model_chunks: list) -> tuple[list[Holding], dict[str, tuple[torch.nn.Module, str]]]:
    """This rank's exported parameters as `Holding`s, and key -> (owner module, parameter name).

    Expert parameters are split over expert-TP (rank/size from the expert-TP group), the others over TP;
    a tied output layer is not exported (the engine gets the embedding). No collectives."""
    spec = model_info(model_chunks).spec
    tp, tp_rank = mps.get_tensor_model_parallel_world_size(), mps.get_tensor_model_parallel_rank()
    etp, etp_rank = tp, tp_rank
    if spec.is_moe:
        etp, etp_rank = mps.get_expert_tensor_parallel_world_size(), mps.get_expert_tensor_parallel_rank()
    holdings, where = [], {}
    for pm in param_maps(model_chunks):
        if not pm.export:
            continue
        model = unwrap(model_chunks[pm.chunk_index])
        mod_name, _, p_name = pm.local_name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        param = getattr(module, p_name)
        rank, size = (etp_rank, etp) if pm.transform in EXPERT_TRANSFORMS else (tp_rank, tp)
        if TP_DIM[pm.transform] is None:
            rank, size = 0, 1
        pieces = shard_pieces(pm.transform, pm.hf_names, spec, rank, size, param.shape[0])
        if sum(p.numel for p in pieces) != param.numel():
            raise ValueError(
                f"shard pieces of {pm.megatron_name} cover {sum(p.numel for p in pieces)} elements, the "
                f"shard has {param.numel()} {tuple(param.shape)} (mapping.py and the model disagree)."
            )
        holdings.append(Holding(pm.megatron_name, tuple(pieces), str(param.dtype)))
        where[pm.megatron_name] = (module, p_name)
    return holdings, where
