"""Rollout engines behind one protocol (`base.RolloutEngine`) and one factory, `make_engine`.

    from opsd_megatron.rollout import make_engine, SamplingConfig
    engine = make_engine("vllm", "path/to/hf_dir", dtype="bfloat16", seed=0)
    outs = engine.generate(prompt_ids, SamplingConfig(temperature=1.1, top_p=0.95, top_k=20,
    max_new_tokens=1024))

`kind="vllm"` (default; in-process `vllm.LLM`) or `kind="hf"` (`transformers.generate`, same sampling
semantics and logprobs). Backends are imported lazily, so this package imports without vLLM or CUDA.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from opsd_megatron.config.schema import GPU_MEMORY_UTILIZATION, EngineKind
from opsd_megatron.rollout.base import RolloutEngine, RolloutOutput, SamplingConfig

__all__ = ["ENGINE_KINDS", "RolloutEngine", "RolloutOutput", "SamplingConfig", "make_engine"]

ENGINE_KINDS: tuple[str, ...] = typing.get_args(EngineKind)  # declared once: config.EngineKind


def make_engine(
    kind: EngineKind = "vllm",
    model_dir: str | Path = "",
    *,
    dtype: str = "auto",
    seed: int = 0,
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
    tensor_parallel_size: int = 1,
    enable_sleep_mode: bool = False,
    max_model_len: int | None = None,
    **kwargs: Any,
) -> RolloutEngine:
    """Build a rollout engine of `kind` ("vllm" | "hf") from an HF model directory.

    vLLM-only knobs (`gpu_memory_utilization`, `tensor_parallel_size`, `enable_sleep_mode`, `max_model_len`,
    `load_format`, `enforce_eager`, any other `vllm.LLM` kwarg) are ignored by the HF engine; HF-only knobs
    (`device`, `batch_size`) are passed through `kwargs`.
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"rollout engine kind {kind!r} is not one of {list(ENGINE_KINDS)}.")
    if kind == "vllm":
        from opsd_megatron.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_dir,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=enable_sleep_mode,
            max_model_len=max_model_len,
            **kwargs,
        )
    from opsd_megatron.rollout.hf_engine import HFEngine  # transformers: only the hf engine needs it

    hf_kwargs = {k: v for k, v in kwargs.items() if k in ("device", "batch_size")}
    return HFEngine(model_dir, dtype=dtype, seed=seed, **hf_kwargs)
