"""Slabs of a shard-exact refresh: views of one piece's stretch inside a flat shard or target, the fused
experts handed unstacked, and the per-bucket cache of those views (used by `shard_sync.ShardSyncer`).

    slab(flat, pieces, offsets(pieces), i, dim, lo, hi)   # [lo, hi) along dim of piece i (HF coordinates)
    expert_parts(target, transfers, holdings, shard, me)  # ExpertParts of the local expert weights, or None
"""

from __future__ import annotations

import torch

from opsd_megatron.rollout.refresh.plan import Bucket
from opsd_megatron.rollout.refresh.vllm_layout import ExpertParts, Target

EXPERT_TARGETS = (".w13_weight", ".w2_weight")  # vLLM's fused experts [E, N, K] (refresh/vllm_layout.py)


def offsets(pieces) -> list[int]:
    out, o = [], 0
    for p in pieces:
        out.append(o)
        o += p.numel
    return out


def slab(flat: torch.Tensor, pieces, offsets, i: int, dim: int, lo: int, hi: int) -> torch.Tensor:
    """View of [lo, hi) along `dim` (HF coordinates) of piece `i` inside a flat shard."""
    p = pieces[i]
    block = flat[offsets[i] : offsets[i] + p.numel].view(p.slab_shape)
    return block.narrow(dim, lo - p.start, hi - lo)


def zero_padding(buf: torch.Tensor, t: Target) -> None:
    """Zero the pieces of target `t` that no HF tensor fills (padding), inside its storage `buf`."""
    flat, offs = buf.view(-1), offsets(t.pieces)
    for i, p in enumerate(t.pieces):
        if p.hf_name is None:
            flat[offs[i] : offs[i] + p.numel].zero_()


def expert_parts(t: Target, trs: list, holdings: dict, shard, me: int) -> ExpertParts | None:
    """Fused experts `t` [E, N, K] whose every expert block is exactly one local Megatron expert weight
    (its pieces, whole, from this rank: equal TP for the experts): those weights as `ExpertParts`
    (views, no copy). None otherwise."""
    if not t.name.endswith(EXPERT_TARGETS) or len(t.shape) != 3 or len(t.pieces) % t.shape[0]:
        return None
    k, by_piece = len(t.pieces) // t.shape[0], {}
    for tr in trs:
        by_piece.setdefault(tr.dst_piece, []).append(tr)
    parts = []
    for e in range(t.shape[0]):
        feeds = [by_piece.get(j, []) for j in range(e * k, (e + 1) * k)]
        if any(len(f) != 1 for f in feeds):
            return None
        feeds = [f[0] for f in feeds]
        h = holdings.get(feeds[0].key)
        group = tuple(t.pieces[e * k : (e + 1) * k])
        if h is None or tuple(h.pieces) != group:
            return None
        for i, tr in enumerate(feeds):
            p = group[i]
            if (tr.src, tr.key, tr.src_piece, tr.lo, tr.hi) != (me, h.key, i, p.start, p.stop):
                return None
        parts.append(shard(h.key).view(t.shape[1:]))
    return ExpertParts(parts)


class BucketViews:
    """Per bucket, kept between refreshes: the slab views of its transfers (source, destination; by
    transfer) while every target and local shard is still the same memory (else rebuilt: a replaced
    parameter, a LoRA-hooked shard), and the transfer orders (local; sends by destination; receives by
    source). Building ~2 views per transfer costs more than many of the copies. A stale entry keeps the
    memory it viewed alive until its bucket's next refresh replaces it."""

    def __init__(self) -> None:
        self._orders: dict[int, tuple] = {}
        self._views: dict[int, tuple] = {}  # bucket -> (memory key, source views, destination views)

    def get(self, bucket: Bucket, me: int, targets: dict, shard) -> tuple[dict, dict, tuple]:
        """(source views, destination views) by `id(transfer)`, filled by the caller, and the orders."""
        orders = self._orders.get(id(bucket))
        if orders is None:
            trs = bucket.transfers
            orders = self._orders[id(bucket)] = (
                [tr for tr in trs if tr.src == me and tr.dst == me],
                sorted((tr for tr in trs if tr.src == me and tr.dst != me), key=lambda tr: tr.dst),
                sorted((tr for tr in trs if tr.dst == me and tr.src != me), key=lambda tr: tr.src),
            )
        ptrs = []
        for n in sorted(targets):
            t = targets[n]
            ptrs.append(tuple(p.data_ptr() for p in t.parts) if isinstance(t, ExpertParts) else t.data_ptr())
        keys = sorted({tr.key for tr in bucket.transfers if tr.src == me})
        key = (tuple(ptrs), tuple(shard(k).data_ptr() for k in keys))
        memo = self._views.get(id(bucket))
        if memo is None or memo[0] != key:
            memo = self._views[id(bucket)] = (key, {}, {})
        return memo[1], memo[2], orders
