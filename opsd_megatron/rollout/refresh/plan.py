"""The transfer plan of a shard-exact refresh: which rank sends which slab to which engine rank, per bucket.

    plan = build_plan(holdings_by_rank, engines_by_rank, dp_by_rank, spec, bucket_bytes, itemsize)
    plan.buckets[b]        # Bucket: targets per receiving rank, transfers in a fixed global order

Inputs (gathered once from every rank of the world, `ShardSyncer`): what each rank holds (`Holding`s: its
Megatron shards as pieces of HF tensors, mcore/conversion/shards.py), which engine rank it hosts
((engine TP size, engine rank) or None) and its data-parallel rank. For every receiving rank, the vLLM
parameters it holds are listed as pieces (`vllm_layout.vllm_targets`); every piece is covered by slabs of
holders' pieces of the same HF tensor along the same dimension, taking for each stretch the best holder:
the receiver itself (no communication: with equal Megatron and engine TP layouts everything is local), then
a holder of the same data-parallel replica, then the nearest rank. PP stages and EP ranks are simply the
holders of their layers/experts: they send only to the engine ranks that need them.

Buckets are whole layer groups (a decoder layer, or one top-level tensor; vLLM fuses q/k/v, gate/up and
all experts of a layer) until the largest receiver's bucket exceeds `bucket_bytes`. The plan is a pure
function of its inputs, so every rank computes the same one; a bucket whose transfers are all local needs no
collective (`Bucket.remote` False).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opsd_megatron.mcore.conversion.shards import Holding, Piece
from opsd_megatron.mcore.models.hf_config import ModelSpec
from opsd_megatron.rollout.refresh.buckets import layer_group
from opsd_megatron.rollout.refresh.vllm_layout import Target, vllm_targets


@dataclass(frozen=True)
class Transfer:
    """Slab [lo, hi) along `dim` of one HF tensor, from piece `src_piece` of `src`'s holding `key` into
    piece `dst_piece` of `dst`'s target `target`."""

    src: int
    dst: int
    key: str
    src_piece: int
    target: str
    dst_piece: int
    dim: int
    lo: int
    hi: int
    numel: int


@dataclass
class Bucket:
    """One refresh call: targets per receiving rank and the transfers that fill them (global order)."""

    targets: dict[int, list[Target]] = field(default_factory=dict)
    transfers: list[Transfer] = field(default_factory=list)
    remote: bool = False  # some transfer crosses ranks: one all-to-all for this bucket


@dataclass
class Plan:
    buckets: list[Bucket]
    holdings: dict[int, dict[str, Holding]]  # rank -> key -> holding


def _group_order(name: str) -> tuple:
    """Global order of layer groups: embedding, layers by index, final norm, lm_head."""
    g = layer_group(name)
    if "embed_tokens" in g:
        return (0, 0, g)
    if ".layers." in g:
        return (1, int(g.rsplit(".", 1)[1]), g)
    return (3 if g.startswith("lm_head") else 2, 0, g)


def _cover(
    need: Piece, cands: list[tuple[tuple, int, str, int, Piece]]
) -> list[tuple[int, str, int, int, int]]:
    """Cover need's [start, stop) with the best candidate per stretch: [(rank, key, piece, lo, hi)]."""
    cuts = {need.start, need.stop}
    for _, _, _, _, p in cands:
        cuts.update(c for c in (p.start, p.stop) if need.start < c < need.stop)
    edges = sorted(cuts)
    out: list[list] = []
    for lo, hi in zip(edges, edges[1:]):
        best = min(
            (c for c in cands if c[4].start <= lo and hi <= c[4].stop), key=lambda c: c[0], default=None
        )
        if best is None:
            raise ValueError(
                f"no rank holds [{lo}, {hi}) along dim {need.dim} of {need.hf_name} (the engine needs it)."
            )
        _, rank, key, idx, _ = best
        if out and out[-1][:3] == [rank, key, idx] and out[-1][4] == lo:
            out[-1][4] = hi
        else:
            out.append([rank, key, idx, lo, hi])
    return [tuple(o) for o in out]


def build_plan(
    holdings_by_rank: dict[int, list[Holding]],
    engines_by_rank: dict[int, tuple[int, int] | None],
    dp_by_rank: dict[int, int],
    spec: ModelSpec,
    bucket_bytes: int,
    itemsize: int,
) -> Plan:
    """The plan (module doc). `engines_by_rank[r]` = (engine TP size, engine rank) of rank r's engine."""
    index: dict[str, list[tuple[int, str, int, Piece]]] = {}
    for rank, hs in holdings_by_rank.items():
        for h in hs:
            for i, p in enumerate(h.pieces):
                if p.hf_name is not None:
                    index.setdefault(p.hf_name, []).append((rank, h.key, i, p))
    groups: dict[str, list[str]] = {}
    for name in index:
        groups.setdefault(layer_group(name), []).append(name)
    ordered = sorted(groups, key=_group_order)
    receivers = sorted(r for r, e in engines_by_rank.items() if e is not None)
    buckets, cur, cur_bytes = [], Bucket(), 0
    for g in ordered:
        names = groups[g]
        per_rank = {r: vllm_targets(names, spec, *engines_by_rank[r]) for r in receivers}
        size = max((sum(_numel(t) for t in ts) * itemsize for ts in per_rank.values()), default=0)
        if cur.targets and cur_bytes + size > bucket_bytes:
            buckets.append(cur)
            cur, cur_bytes = Bucket(), 0
        cur_bytes += size
        for r, ts in per_rank.items():
            cur.targets.setdefault(r, []).extend(ts)
            for t in ts:
                for j, need in enumerate(t.pieces):
                    if need.hf_name is None:
                        continue
                    cands = [
                        ((rk != r, dp_by_rank[rk] != dp_by_rank[r], abs(rk - r), rk), rk, key, i, p)
                        for rk, key, i, p in index[need.hf_name]
                        if p.dim == need.dim
                    ]
                    for rk, key, i, lo, hi in _cover(need, cands):
                        n = need.numel // (need.stop - need.start) * (hi - lo)
                        tr = Transfer(rk, r, key, i, t.name, j, need.dim, lo, hi, n)
                        cur.transfers.append(tr)
                        cur.remote = cur.remote or rk != r
    if cur.targets:
        buckets.append(cur)
    holdings = {r: {h.key: h for h in hs} for r, hs in holdings_by_rank.items()}
    return Plan(buckets, holdings)


def _numel(t: Target) -> int:
    n = 1
    for s in t.shape:
        n *= s
    return n
