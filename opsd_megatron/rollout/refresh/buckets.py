"""Bucketed weight refresh of full tensors: a stream of `(hf_name, full tensor)` → engine, bucket by bucket.

    stats = push_weights(export_hf_weights(chunks), engine, bucket_bytes=256 << 20, dtype=torch.bfloat16)
    log(stats.metrics())                     # {"refresh/seconds": .., "refresh/bytes": .., ...}

The full-tensor path of `WeightSyncer` (syncer.py) for engines without `load_shards` (the HF engine) or a
custom export; vLLM engines get the shard-exact path (shard_sync.py). The stream comes from
`opsd_megatron.mcore.conversion.export_hf_weights(model_chunks)` (a collective: every rank iterates it and
gets full tensors). Ranks that host no engine (`engine=None`) drop each tensor at once;
ranks with an engine collect tensors into a bucket of at most `bucket_bytes` (cast to `dtype` first) and
hand the bucket to `engine.update_weights` before the next one is built, so the extra memory is about one
bucket, not one model.

Bucket boundaries fall only *between* groups (`layer_group`: one decoder layer, or one top-level tensor):
vLLM's layerwise reload materialises a fused module (qkv_proj, gate_up_proj) from `torch.empty` and keeps
garbage where a call delivered only part of it, so q/k/v and gate/up of one layer must travel in the same
bucket. A bucket therefore exceeds `bucket_bytes` by at most one group (a stream does not announce group
sizes): the peak extra memory of a refresh stays below `bucket_bytes` + one decoder layer.

MoE: vLLM also fuses all experts of a layer into one module (w13 / w2), so an expert group must not be split
either; the experts are named `model.layers.{i}.mlp.experts.{e}...`, so the layer group keeps them whole.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from opsd_megatron.rollout.base import RolloutEngine

NamedTensors = Iterable[tuple[str, torch.Tensor]]

_LAYER_RE = re.compile(r"^(.*?layers\.\d+)\.")


def layer_group(hf_name: str) -> str:
    """Group key of an HF name: `model.layers.7.mlp.up_proj.weight` -> `model.layers.7`; others: the name."""
    m = _LAYER_RE.match(hf_name)
    return m.group(1) if m else hf_name


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(
    named_tensors: NamedTensors,
    bucket_bytes: int,
    *,
    dtype: torch.dtype | None = None,
    group_fn: Callable[[str], str] = layer_group,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of `(name, tensor)` of at most `bucket_bytes` + one group each.

    A bucket is closed before a tensor of a *new* group that would overflow it; tensors of one group never
    straddle two buckets. Tensors are cast to `dtype` (when given) before they are counted.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}.")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    group = None
    for name, t in named_tensors:
        if dtype is not None and t.dtype != dtype and t.is_floating_point():
            t = t.to(dtype)
        g = group_fn(name)
        nbytes = tensor_bytes(t)
        if bucket and g != group and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
        group = g
    if bucket:
        yield bucket


@dataclass
class RefreshStats:
    """Timing and volume of one weight refresh (this rank's view)."""

    seconds: float = 0.0
    """Wall time of the whole refresh (export + load)."""
    export_seconds: float = 0.0
    """Time spent producing tensors (all-gathers / broadcasts / renaming inside the export stream)."""
    load_seconds: float = 0.0
    """Time spent inside `engine.update_weights` (0 on ranks without an engine)."""
    bytes: int = 0
    """Bytes pushed into the engine (after the dtype cast); bytes streamed when no engine is hosted."""
    tensors: int = 0
    """Number of named tensors streamed."""
    buckets: int = 0
    """Number of `update_weights` calls."""
    max_bucket_bytes: int = 0
    """Largest bucket: the peak extra memory the refresh held at once."""
    materialised_bytes: int = 0
    """Bytes of fresh tensors this rank built (shard-exact: targets, send/receive buffers, hooked shards)."""
    collectives: int = 0
    """Collectives this rank took part in (shard-exact: one all-to-all per bucket that crosses ranks)."""
    sent_bytes: int = 0
    """Bytes this rank sent to other ranks (shard-exact)."""

    def metrics(self, prefix: str = "refresh/") -> dict[str, float]:
        """Flat dict for loggers; throughput in GB/s is added."""
        out = {prefix + k: float(v) for k, v in asdict(self).items()}
        out[prefix + "gbps"] = self.bytes / max(self.seconds, 1e-9) / 1e9
        return out


def _timed(it: Iterable[Any], acc: list[float]) -> Iterator[Any]:
    """Yield from `it`, adding the time spent inside `next(it)` to `acc[0]`."""
    it = iter(it)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            acc[0] += time.perf_counter() - t0
            return
        acc[0] += time.perf_counter() - t0
        yield item


def push_weights(
    named_tensors: NamedTensors,
    engine: RolloutEngine | None,
    *,
    bucket_bytes: int = 256 << 20,
    dtype: torch.dtype | None = None,
    group_fn: Callable[[str], str] = layer_group,
) -> RefreshStats:
    """Stream `named_tensors` into `engine` bucket by bucket; with `engine=None` just consume the stream.

    The stream is always fully consumed (it may be a collective that every rank must drive).
    """
    stats = RefreshStats()
    t_start = time.perf_counter()
    export_acc = [0.0]
    stream = _timed(named_tensors, export_acc)
    if engine is None:
        for _name, t in stream:
            stats.tensors += 1
            stats.bytes += tensor_bytes(t)
            del t
    else:
        for bucket in iter_buckets(stream, bucket_bytes, dtype=dtype, group_fn=group_fn):
            nbytes = sum(tensor_bytes(t) for _, t in bucket)
            t0 = time.perf_counter()
            engine.update_weights(bucket)
            stats.load_seconds += time.perf_counter() - t0
            stats.buckets += 1
            stats.tensors += len(bucket)
            stats.bytes += nbytes
            stats.max_bucket_bytes = max(stats.max_bucket_bytes, nbytes)
            del bucket
    stats.export_seconds = export_acc[0]
    stats.seconds = time.perf_counter() - t_start
    return stats
