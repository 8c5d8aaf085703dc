"""Megatron → rollout-engine weight refresh (bucketed) and the rollout-vs-trainer drift check.

    from opsd_megatron.rollout.refresh import WeightSyncer, compute_drift, DriftGuard
    syncer = WeightSyncer(engine, bucket_bytes=256 << 20, dtype=torch.bfloat16)
    stats = syncer.sync(model_chunks)          # collective; RefreshStats(seconds, bytes, buckets, ...)

Submodules: `syncer` (`WeightSyncer`: picks the path), `shard_sync` + `plan` + `vllm_layout` (shard-exact:
each engine rank receives its own slabs, loaded straight into vLLM's parameters), `buckets` (full tensors:
stream → buckets → `engine.update_weights`), `drift` (metrics and guard; the
trainer side's sampled-token logprobs: `opsd_megatron.losses.vocab_parallel_token_logprobs`).
"""

from opsd_megatron.rollout.refresh.buckets import (
    RefreshStats,
    iter_buckets,
    layer_group,
    push_weights,
)
from opsd_megatron.rollout.refresh.drift import (
    DriftError,
    DriftGuard,
    compute_drift,
)
from opsd_megatron.rollout.refresh.syncer import WeightSyncer

__all__ = [
    "DriftError",
    "DriftGuard",
    "RefreshStats",
    "WeightSyncer",
    "compute_drift",
    "iter_buckets",
    "layer_group",
    "push_weights",
]
