"""`WeightSyncer`: refresh the rollout engines from the live Megatron model after every optimizer step.

    syncer = WeightSyncer(engine, bucket_bytes=256 << 20, dtype=torch.bf16, export_kwargs={"shard_hook": h})
    stats = syncer.sync(model_chunks)        # collective: every rank of the world calls it, engine or not

Two paths, chosen once (first `sync`, one `all_gather_object` so that every rank takes the same one):
* shard-exact (`shard_sync.ShardSyncer`): when every rank's engine offers `load_shards` (vLLM) or the rank
  has none, and no custom `export_fn` is given. Each engine rank receives only its own slabs, one
  all-to-all per bucket at most, loaded straight into vLLM's parameters.
* full tensors (`buckets.push_weights` over `export_hf_weights`): otherwise (the HF engine, a custom export,
  no process group); the reason is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from opsd_megatron.mcore.conversion import export_hf_weights
from opsd_megatron.rollout.base import RolloutEngine
from opsd_megatron.rollout.refresh.buckets import NamedTensors, RefreshStats, push_weights
from opsd_megatron.rollout.refresh.shard_sync import ShardSyncer

logger = logging.getLogger(__name__)


class WeightSyncer:
    """Refresh a rollout engine from the live Megatron model (module doc).

    Args:
        engine: the engine this rank hosts, or None (the rank still takes part in the collectives).
        bucket_bytes: maximum bytes per engine load call (peak extra memory of a refresh, + one layer).
        dtype: the engine's dtype (tensors are cast to it); None keeps the model's.
        export_fn: `model_chunks -> iterator of (hf_name, full tensor)`; given: the full-tensor path.
        export_kwargs: extra keyword arguments for the export; `shard_hook` is used by both paths.
        shard_exact: None chooses (module doc); False forces the full-tensor path.
    """

    def __init__(
        self,
        engine: RolloutEngine | None,
        *,
        bucket_bytes: int = 256 << 20,
        dtype: torch.dtype | None = None,
        export_fn: Callable[..., NamedTensors] | None = None,
        export_kwargs: dict[str, Any] | None = None,
        shard_exact: bool | None = None,
    ) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"WeightSyncer.bucket_bytes must be positive, got {bucket_bytes}.")
        self.engine = engine
        self.bucket_bytes = int(bucket_bytes)
        self.dtype = dtype
        self.export_fn = export_fn
        self.export_kwargs = dict(export_kwargs or {})
        self.shard_exact = shard_exact
        self.shards: ShardSyncer | None = None
        self.last_stats: RefreshStats | None = None

    def _choose(self, engine: RolloutEngine | None) -> bool:
        """Whether every rank can take the shard-exact path (collective once, module doc)."""
        if self.shard_exact is False or self.export_fn is not None:
            return False
        if not (dist.is_available() and dist.is_initialized()):
            why = "no torch.distributed process group"
        else:
            able = [None] * dist.get_world_size()
            dist.all_gather_object(able, engine is None or hasattr(engine, "load_shards"))
            if all(able):
                return True
            why = f"ranks {[r for r, a in enumerate(able) if not a]} host engines without load_shards"
        logger.info("weight refresh: full tensors per rank (%s)", why)
        return False

    def sync(self, model_chunks: Any, engine: RolloutEngine | None = None) -> RefreshStats:
        """Push the model's weights into `engine` (default: the syncer's). Collective."""
        engine = engine if engine is not None else self.engine
        if engine is not None:
            engine.wake_up()
        if self.shard_exact is None:
            self.shard_exact = self._choose(engine)
        if self.shard_exact:
            if self.shards is None:
                self.shards = ShardSyncer(
                    engine, bucket_bytes=self.bucket_bytes, dtype=self.dtype,
                    shard_hook=self.export_kwargs.get("shard_hook"),
                )  # fmt: skip
            stats = self.shards.sync(model_chunks, engine)
        else:
            stream = (self.export_fn or export_hf_weights)(model_chunks, **self.export_kwargs)
            stats = push_weights(stream, engine, bucket_bytes=self.bucket_bytes, dtype=self.dtype)
        self.last_stats = stats
        return stats
