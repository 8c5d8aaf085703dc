"""Slabs of a shard-exact refresh: views of one piece's stretch inside a flat shard or target, the fused
experts handed unstacked, and the per-bucket cache of those views (used by `shard_sync.ShardSyncer`).

    slab(flat, pieces, offsets(pieces), i, dim, lo, hi)   # [lo, hi) along dim of piece i (HF coordinates)
    target_kinds(bucket, me, holdings, views, ...)        # how each target is stored (engine view, ...)
"""

from __future__ import annotations

from typing import Any

import torch

from opsd_megatron.rollout.refresh.plan import Bucket, Plan
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


def expert_keys(t: Target, trs: list, holdings: dict, me: int) -> list[str] | None:
    """Fused experts `t` [E, N, K] whose every expert block is exactly one local Megatron expert weight
    (its pieces, whole, from this rank: equal TP for the experts): those weights' holding keys, by expert
    (the refresh hands them as `ExpertParts`, views, no copy). None otherwise."""
    if not t.name.endswith(EXPERT_TARGETS) or len(t.shape) != 3 or len(t.pieces) % t.shape[0]:
        return None
    k, by_piece = len(t.pieces) // t.shape[0], {}
    for tr in trs:
        by_piece.setdefault(tr.dst_piece, []).append(tr)
    keys = []
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
        keys.append(h.key)
    return keys


def target_kinds(bucket: Bucket, me: int, holdings: dict, views: dict, dtype: torch.dtype, experts: bool,
                 reusable: tuple[str, ...]) -> dict[str, tuple[str, object]]:  # fmt: skip
    """How each of this rank's targets in `bucket` is stored, name -> (kind, payload): "view" (the engine's
    own parameter from `views`, filled in place), "parts" (payload: the local expert weights' keys, when
    `experts`), "same" (payload: the local shard's key: the layouts are equal), "scratch" (kept memory:
    the engine copies these out, suffix in `reusable`), "fresh". A pure function of the plan and `views`."""
    feeds: dict[str, list] = {}
    for tr in bucket.transfers:
        if tr.dst == me:
            feeds.setdefault(tr.target, []).append(tr)
    out: dict[str, tuple[str, object]] = {}
    for t in bucket.targets.get(me, []):
        view = views.get(t.name)
        if view is not None and view.dtype == dtype and tuple(view.shape) == tuple(t.shape):
            out[t.name] = ("view", None)
            continue
        trs = feeds.get(t.name, [])
        keys = expert_keys(t, trs, holdings, me) if experts else None
        if keys is not None:
            out[t.name] = ("parts", keys)
            continue
        h = holdings.get(trs[0].key) if trs else None
        if (
            h is not None
            and all(tr.src == me and tr.key == h.key for tr in trs)
            and len(trs) == len(t.pieces)
            and h.pieces == t.pieces
        ):
            out[t.name] = ("same", h.key)
        else:
            out[t.name] = ("scratch" if reusable and t.name.endswith(reusable) else "fresh", None)
    return out


def arena_layout(plan: Plan, me: int, engine: Any, dtype: torch.dtype, experts: bool,
                 reusable: tuple[str, ...]) -> tuple[dict[int, dict[str, int]], int]:  # fmt: skip
    """This rank's targets that live in the same-host exchange's arena, per remote bucket ({bucket index:
    {name: offset}}), and the arena's length: its kept-scratch targets (`target_kinds`), which the other
    ranks then write into directly (no pack, no unpack). Asks `engine` for its views once per bucket."""
    layout, size = {}, 0
    offer = getattr(engine, "shard_views", None)
    for i, b in enumerate(plan.buckets):
        mine = b.targets.get(me, [])
        if not b.remote or not mine:
            continue
        views = offer({t.name: tuple(t.shape) for t in mine}) if offer is not None else {}
        kinds = target_kinds(b, me, plan.holdings[me], views, dtype, experts, reusable)
        o, layout[i] = 0, {}
        for t in mine:
            if kinds[t.name][0] == "scratch":
                layout[i][t.name], o = o, o + int(torch.Size(t.shape).numel())
        size = max(size, o)
    return layout, size


def target_of(bucket: Bucket, rank: int, name: str) -> Target:
    """Rank `rank`'s target `name` in `bucket`."""
    return next(t for t in bucket.targets[rank] if t.name == name)


class BucketViews:
    """Per bucket, kept between refreshes: the slab views of its transfers (source, destination; by
    transfer) while every target and local shard is still the same memory (else rebuilt: a replaced
    parameter, a LoRA-hooked shard), and the transfer orders (local; sends by destination; receives by
    source). Building ~2 views per transfer costs more than many of the copies. A stale entry keeps the
    memory it viewed alive until its bucket's next refresh replaces it."""

    def __init__(self) -> None:
        self._orders: dict[int, tuple] = {}
        self._views: dict[tuple, dict] = {}  # (bucket, parity) -> {memory key: (source, destination views)}

    def get(self, bucket: Bucket, me: int, targets: dict, shard, parity: int = 0) -> tuple[dict, dict, tuple]:
        """(source views, destination views) by `id(transfer)`, filled by the caller, and the orders.
        `parity`: the exchange's slot / arena parity (direct writes view another rank's arena): one memo
        per parity."""
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
        memos = self._views.setdefault((id(bucket), parity), {})
        if key not in memos:
            memos.clear()
            memos[key] = ({}, {})
        srcs, dsts = memos[key]
        return srcs, dsts, orders
