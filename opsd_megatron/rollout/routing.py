"""Which rank receives which part of the step's responses: each replica only the slice it trains on.

    parts = routes(shares, slices, drivers, replica_of)      # (engine, rank, lo, hi): who sends what to whom
    mine = exchange(rank, parts, payload_of, group)         # point-to-point over a gloo group

The step's global batch [0, n) is cut twice, independently: into contiguous engine shares (engine e
generates [lo_e, hi_e), `EnginePlacement.prompt_share`) and into contiguous data-parallel slices (replica d
trains on [a_d, b_d)). Every rank of replica d needs exactly [a_d, b_d); it gets it from the drivers (first
ranks) of the engines whose shares overlap it, each sending only the overlap. So a rank receives its
replica's slice and nothing else (an `all_gather_object` of every share to every rank moved world × n rows),
and the assignment of samples to replicas is the one of the whole-batch gather: runs stay bit-identical.

Transport: two rounds of `isend`/`irecv` over `group` (gloo, the whole world, so group ranks are global
ranks): the pickled sizes (one int64 each), then the payloads (uint8). A driver's part for its own rank is
handed over without a message. Every rank computes the same routes from the same numbers, so no rank
waits for a message nobody sends.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist


class Part(NamedTuple):
    """Rows [lo, hi) of the global batch, sent by engine `engine`'s driver `src` to rank `dst`."""

    engine: int
    src: int
    dst: int
    lo: int
    hi: int


def routes(
    shares: Sequence[tuple[int, int]],
    slices: Sequence[tuple[int, int]],
    drivers: Sequence[int],
    replica_of: Sequence[int],
) -> list[Part]:
    """Every (engine driver -> rank) part of the step: engine e's share `shares[e]` overlapped with the slice
    `slices[replica_of[r]]` of every rank r; `drivers[e]`: engine e's first rank. Sorted by (dst, engine),
    i.e. for each rank its parts in global order."""
    out = []
    for dst, d in enumerate(replica_of):
        a, b = slices[d]
        for e, (lo, hi) in enumerate(shares):
            if max(lo, a) < min(hi, b):
                out.append(Part(e, drivers[e], dst, max(lo, a), min(hi, b)))
    return out


def exchange(rank: int, parts: Sequence[Part], payload: Callable[[Part], Any], group: Any = None) -> list:
    """The objects of this rank's parts (`dst == rank`), in the order of `parts`; `payload(part)` builds a
    part's object on its driver (`src == rank`). Point-to-point over `group` (see the module docstring)."""
    sends = [(p, pickle.dumps(payload(p))) for p in parts if p.src == rank and p.dst != rank]
    recvs = [p for p in parts if p.dst == rank and p.src != rank]
    out_sizes = [torch.tensor([len(b)], dtype=torch.int64) for _, b in sends]  # alive until waited
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in recvs]
    _wait(
        [dist.isend(t, p.dst, group=group) for (p, _), t in zip(sends, out_sizes)]
        + [dist.irecv(t, p.src, group=group) for p, t in zip(recvs, sizes)]
    )
    out_bufs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for _, b in sends]
    bufs = [torch.empty(int(t.item()), dtype=torch.uint8) for t in sizes]
    _wait(
        [dist.isend(t, p.dst, group=group) for (p, _), t in zip(sends, out_bufs)]
        + [dist.irecv(t, p.src, group=group) for p, t in zip(recvs, bufs)]
    )
    got = {p: pickle.loads(t.numpy().tobytes()) for p, t in zip(recvs, bufs)}
    return [got[p] if p.src != rank else payload(p) for p in parts if p.dst == rank]


def _wait(works: list) -> None:
    for w in works:
        w.wait()
