"""Mixture-of-experts (Qwen3-MoE) on Megatron-core: config, checks, expert placement, router-loss metrics.

HF Qwen3-MoE routing per token: p = softmax(x @ W_gate^T) over E experts (fp32), keep the top-k; with
`norm_topk_prob` the k kept probabilities are renormalised to sum to 1. Megatron's router reproduces this
exactly: `moe_router_pre_softmax=False` (top-k of the logits, softmax over those k) when `norm_topk_prob`,
`pre_softmax=True` (softmax over all E, then top-k) otherwise; score function softmax, router in fp32.

Experts: E experts are split over the expert-parallel (EP) group, E/ep consecutive experts per EP rank
(`global_expert(ep_rank, local, spec, ep)`); each expert's fc1/fc2 is split over the expert tensor-parallel
(ETP) group like a dense MLP. EP is carved out of data parallelism: attention and dense MLPs are replicated
across EP ranks (each rank has its own tokens), expert weights are not. Tokens reach their experts through
Megatron's alltoall token dispatcher (all-to-all over the EP group; allgather on CPU, see
`token_dispatcher`). CPU: Megatron's SequentialMLP (one
expert after another); CUDA + Transformer Engine: grouped GEMM.

Router losses (`moe.aux_loss_coeff`, `moe.z_loss_coeff` in the trainer config; `DEFAULT_*` below): the
switch-style load-balancing loss with the HF config's `router_aux_loss_coef` (0.001 for Qwen3-MoE: the
value the model was trained with, small enough not to pull routing away from what pre-training learned,
large enough to stop experts from collapsing during distillation); z-loss off (Qwen3-MoE was not trained
with one).
`router_loss_metrics()` reads Megatron's per-layer tracker once per step (mean over micro-batches, MoE layers;
the same value at every TP x PP x EP x DP layout).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from opsd_megatron.mcore import cpu, patches
from opsd_megatron.mcore.models.hf_config import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_Z_LOSS_COEFF = 0.0
"""Router z-loss coefficient when the config gives none (off; 1e-3 is Megatron's suggested start)."""
FALLBACK_AUX_LOSS_COEFF = 1e-3
"""Load-balancing loss coefficient when neither the trainer config nor the HF config gives one."""


def default_aux_loss_coeff(spec: ModelSpec) -> float:
    """The HF config's `router_aux_loss_coef` (0.001 for Qwen3-MoE), else FALLBACK_AUX_LOSS_COEFF."""
    return spec.router_aux_loss_coef if spec.router_aux_loss_coef > 0 else FALLBACK_AUX_LOSS_COEFF


def check_moe_divisibility(spec: ModelSpec, ep: int, etp: int) -> None:
    """ValueError naming the HF config key when EP does not divide the experts or ETP the expert width."""
    if ep < 1 or spec.num_experts % ep != 0:
        raise ValueError(
            f"expert parallel size (parallel.ep) {ep} does not divide HF config 'num_experts' "
            f"({spec.num_experts})."
        )
    if etp < 1 or spec.moe_ffn_hidden_size % etp != 0:
        raise ValueError(
            f"expert tensor parallel size {etp} does not divide HF config 'moe_intermediate_size' "
            f"({spec.moe_ffn_hidden_size})."
        )


def patch_megatron_moe() -> None:
    """Work around a megatron-core 0.16.1 bug (written for 0.16.1): `moe_utils.RouterGatingLinearFunction`
    reads the module global `te_general_gemm`, which is only defined when Transformer Engine imports, so
    every MoE router forward without TE raises NameError. Defining it as None selects the library's own
    torch.mm path. Idempotent; a no-op where the global exists (TE present, or a fixed release)."""
    if patches.target("megatron.moe_router_te_gemm") is None:  # registry: megatron-core 0.16.1
        return
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        log.info("megatron-core MoE without Transformer Engine: defined moe_utils.te_general_gemm = None")


_GATHER_HELPERS = (
    "_gather_along_first_dim",
    "_reduce_scatter_along_first_dim",
    "_gather_along_last_dim",
    "_reduce_scatter_along_last_dim",
)


def patch_mappings_for_cpu_backward() -> None:
    """CPU only (written for megatron-core 0.16.1 + torch 2.13): the expert-parallel token dispatch
    all-gathers / reduce-scatters tokens, and those helpers in `tensor_parallel.mappings` allocate with
    `device=torch.cuda.current_device()` (0 under the CPU shim). In a backward pass the autograd engine does
    not carry the shim's cuda->cpu TorchFunctionMode, so `device=0` there raises "Cannot access accelerator
    device". The helpers are wrapped to run inside the shim's mode when it is not active. Idempotent."""
    if torch.cuda.is_available():
        return
    stack_len = getattr(*patches.target("torch.function_stack_len"))  # raise when torch moved them
    stack_at = getattr(*patches.target("torch.function_stack_at"))

    def wrap(fn):
        def run(*args, **kwargs):
            n = stack_len()
            mode = cpu._MODE
            if mode is None or (n and stack_at(n - 1) is mode):
                return fn(*args, **kwargs)
            with cpu._CudaToCpuMode():
                return fn(*args, **kwargs)

        run._opsd_cpu_wrapped = True
        return run

    for name in _GATHER_HELPERS:
        mappings, attr = patches.target(f"megatron.mappings.{name}")  # required: raises when it moved
        fn = getattr(mappings, attr)
        if not getattr(fn, "_opsd_cpu_wrapped", False):
            setattr(mappings, attr, wrap(fn))


def moe_config_kwargs(spec: ModelSpec, *, ep: int, etp: int, grouped_gemm: bool) -> dict[str, Any]:
    """TransformerConfig keyword arguments for the MoE part of `spec` (see the module docstring)."""
    patch_megatron_moe()
    patch_mappings_for_cpu_backward()
    return dict(
        num_moe_experts=spec.num_experts,
        moe_router_topk=spec.moe_topk,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_layer_freq=[1 if i in spec.moe_layers else 0 for i in range(spec.num_layers)],
        moe_router_pre_softmax=not spec.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=default_aux_loss_coeff(spec),
        moe_z_loss_coeff=None,
        moe_token_dispatcher_type=token_dispatcher(),
        moe_grouped_gemm=grouped_gemm,
        moe_permute_fusion=False,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


_LOGGED_DISPATCHER = False


def token_dispatcher() -> str:
    """ "alltoall" with CUDA; "allgather" on CPU: megatron-core 0.16.1's alltoall dispatcher creates a
    `torch.cuda.Stream` in its constructor (token_dispatcher.py:445), which cannot exist without CUDA. Both
    dispatchers compute the same expert outputs; allgather all-gathers every token over the EP x ETP group."""
    global _LOGGED_DISPATCHER
    import torch

    if torch.cuda.is_available():
        return "alltoall"
    if not _LOGGED_DISPATCHER:
        log.info("MoE on CPU: allgather token dispatcher (the alltoall one needs CUDA streams)")
        _LOGGED_DISPATCHER = True
    return "allgather"


def router_loss_overrides(aux_loss_coeff: float | None, z_loss_coeff: float | None) -> dict[str, Any]:
    """`build_model(**overrides)` for the trainer's `moe.*` keys (None keeps the defaults above)."""
    out: dict[str, Any] = {}
    if aux_loss_coeff is not None:
        out["moe_aux_loss_coeff"] = float(aux_loss_coeff)
    if z_loss_coeff:
        out["moe_z_loss_coeff"] = float(z_loss_coeff)
    return out


def num_local_experts(spec: ModelSpec, ep: int) -> int:
    return spec.num_experts // ep


def global_expert(ep_rank: int, local: int, spec: ModelSpec, ep: int) -> int:
    """Global expert index of local expert `local` on EP rank `ep_rank` (contiguous blocks of E/ep)."""
    return ep_rank * num_local_experts(spec, ep) + local


ROUTER_LOSS_NAMES = ("load_balancing_loss", "z_loss")  # Megatron's tracker names (aux_loss, z-loss)
_SUMMED_OVER_TP = {"load_balancing_loss": True, "z_loss": False}
"""How a tracker value combines over the tensor(-and-context)-parallel group. With sequence parallelism
each TP rank routes only its slice of the tokens: its load-balancing value is a partial sum of the loss
(Megatron's tracker SUMs it over that group), its z-loss value a mean over its own tokens (averaged here;
equal slices). MoE training at TP > 1 needs sequence parallelism (megatron-core refuses it otherwise)."""


def router_loss_metrics(num_layers: int, num_microbatches: int = 1, reset: bool = True) -> dict[str, float]:
    """Router losses of the step just done, mean over micro-batches and MoE layers:
    {"moe/load_balancing_loss": .., ...}.

    Reads Megatron's per-layer aux-loss tracker (unscaled losses, i.e. divided by their coefficient; summed
    over this rank's `num_microbatches` micro-batches, hence divided by it, as Megatron's training loop does).
    Collectives (every rank of the model must call it): all-reduce SUM over the pipeline group (each layer
    lives on one stage), over the tensor-and-context-parallel group (`_SUMMED_OVER_TP`) and over the
    data-parallel group (then / DP). The value is thus the mean over all the step's micro-batches, whatever
    the layout. Megatron's own `reduce_aux_losses_tracker_across_ranks` is not used: it all-reduces with
    `ReduceOp.AVG`, which gloo (CPU) does not implement. A loss no MoE layer recorded (e.g. z-loss off)
    is left out.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mps
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    out = {}
    for name in ROUTER_LOSS_NAMES:  # fixed list: a PP stage without MoE layers still joins the collectives
        entry = tracker.get(name)
        if entry is None and not dist.is_initialized():
            continue
        values = entry["values"].detach().clone().float() if entry else torch.zeros(num_layers)
        values /= max(num_microbatches, 1)
        if dist.is_initialized():
            dist.all_reduce(values, group=mps.get_pipeline_model_parallel_group())
            tp_group = mps.get_tensor_and_context_parallel_group()
            dist.all_reduce(values, group=tp_group)
            if not _SUMMED_OVER_TP[name]:
                values /= dist.get_world_size(tp_group)
            dp_group = mps.get_data_parallel_group()
            dist.all_reduce(values, group=dp_group)
            values /= dist.get_world_size(dp_group)
        used = values[values != 0]
        if used.numel() or entry is not None:
            out[f"moe/{name}"] = float(used.mean().item()) if used.numel() else 0.0
    if reset:
        moe_utils.clear_aux_losses_tracker()
    return out
