"""`AdapterSyncer`: refresh a LoRA run's engines with the adapters only (`rollout.lora_refresh: adapters`).

    syncer = AdapterSyncer(engine, dtype=torch.float32, lora_cfg=cfg.lora, base_model=cfg.model.path)
    stats = syncer.sync(model_chunks)   # collective over the model's groups; RefreshStats (bytes = adapter)

The engine (vLLM, built with `enable_lora`, `max_lora_rank`, `max_loras=1`) loaded the frozen base once at
start-up and never gets base weights again. Each refresh:
1. `mcore.lora.peft_export.peft_adapter_tensors`: every adapter's A and B in PEFT's names and layout (the
   project's LoRA export, the one `opsd-convert export-lora` writes). Collectives: one TP all-gather of the
   sharded factor per adapter; PP > 1: one all_gather_object over the PP group. No base weight is touched,
   so no full-model tensor exists: the extra memory is one copy of the adapters.
2. Ranks with an engine cast them to the engine dtype and write a PEFT adapter directory
   (`adapter_model.safetensors` + `adapter_config.json`) under a directory of their own (vLLM loads LoRA
   from a path): `$TMPDIR/opsd-lora-rank<R>-*/vNNNNNN`, removed when the next version is served and at
   `close()` / exit.
3. `engine.set_lora_adapter(dir)`: vLLM loads it (each engine TP rank keeps its own slice of the adapter)
   and every following `generate` (rollouts and periodic evaluation) serves it; the previous adapter is
   removed and the prefix cache dropped.

Bytes per refresh = the adapter's (`RefreshStats.bytes`, the `refresh/bytes` metric), e.g. 40,960 B against
878,592 B merged on the tiny model (docs/performance.md). On GPU at 32B (Qwen3-32B, rank 64 on every
linear): ~0.54 B adapter parameters = 1.07 GB bf16 per refresh per engine rank (written to its local
temporary directory and read back by vLLM), against ~65 GB merged.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opsd_megatron.mcore.files import save_safetensors
from opsd_megatron.mcore.lora.peft_export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    peft_adapter_tensors,
)
from opsd_megatron.rollout.base import RolloutEngine
from opsd_megatron.rollout.refresh.buckets import RefreshStats, tensor_bytes

logger = logging.getLogger(__name__)


class AdapterSyncer:
    """Serve the live model's LoRA adapters on the engine (module doc); `sync` is `WeightSyncer.sync`'s twin.

    Args:
        engine: the engine this rank hosts (with `set_lora_adapter`), or None (the rank still takes part in
            the export's collectives).
        dtype: the engine's dtype (adapter tensors are cast to it); None keeps the parameters'.
        lora_cfg: `cfg.lora` (rank, alpha, dropout for `adapter_config.json`).
        base_model: written as `base_model_name_or_path`.
        root: where the rank's adapter directory is made (default: the temporary directory, `$TMPDIR`).
    """

    def __init__(
        self,
        engine: RolloutEngine | None,
        *,
        dtype: torch.dtype | None,
        lora_cfg: Any,
        base_model: str | None = None,
        root: str | Path | None = None,
    ) -> None:
        if engine is not None and not hasattr(engine, "set_lora_adapter"):
            raise TypeError(f"AdapterSyncer: the {type(engine).__name__} engine cannot serve LoRA adapters.")
        self.engine, self.dtype, self.lora_cfg, self.base_model = engine, dtype, lora_cfg, base_model
        self.root = root
        self.dir: Path | None = None  # this rank's directory of adapter versions (made at the first sync)
        self.served: Path | None = None  # the version the engine serves
        self.version = 0
        self.last_stats: RefreshStats | None = None
        self._cleanup: weakref.finalize | None = None

    def _next_dir(self) -> Path:
        if self.dir is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self.dir = Path(tempfile.mkdtemp(prefix=f"opsd-lora-rank{rank}-", dir=self.root))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.version += 1
        return self.dir / f"v{self.version:06d}"

    def _write(self, tensors: dict[str, torch.Tensor]) -> Path:
        out = self._next_dir()
        out.mkdir()
        save_safetensors(tensors, out / ADAPTER_WEIGHTS, {"format": "pt"})
        cfg = adapter_config(self.lora_cfg, tensors, self.base_model)
        (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        return out

    def sync(self, model_chunks: Any, engine: RolloutEngine | None = None) -> RefreshStats:
        """Hand the model's current adapters to `engine` (default: the syncer's). Collective (module doc)."""
        engine = engine if engine is not None else self.engine
        stats = RefreshStats()
        t0 = time.perf_counter()
        if engine is not None:
            engine.wake_up()
        tensors = peft_adapter_tensors(model_chunks)
        if self.dtype is not None:
            tensors = {k: v.to(self.dtype) for k, v in tensors.items()}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        stats.export_seconds = time.perf_counter() - t0
        stats.tensors = len(tensors)
        stats.bytes = sum(tensor_bytes(t) for t in tensors.values())
        stats.materialised_bytes = stats.bytes
        if engine is not None:
            t1 = time.perf_counter()
            path = self._write(tensors)
            engine.set_lora_adapter(path)
            if self.served is not None:
                shutil.rmtree(self.served, ignore_errors=True)
            self.served = path
            stats.load_seconds = time.perf_counter() - t1
            stats.buckets, stats.max_bucket_bytes = 1, stats.bytes
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return stats

    def close(self) -> None:
        """Remove this rank's adapter directories (also done at exit)."""
        if self._cleanup is not None:
            self._cleanup()
