"""Put LoRA adapters on a Megatron GPT model, switch them off, merge them, list/save them.

    adapters = apply_lora(model_chunks, lora_cfg)      # before wrapping the chunks in Megatron DDP
    with adapters_disabled(model_chunks):              # the base model (the "adapters-off" teacher)
        ...
    w = merged_local_weight(chunk.decoder.layers[0].self_attention.linear_qkv)   # W_local + scale B A
    for name, t in merged_named_parameters(chunk): ...  # for export: base names, LoRA merged, no LoRA params

Targets. `lora_cfg.target_modules` takes HF names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj,
with or without `_proj`), Megatron names (linear_qkv linear_proj linear_fc1 linear_fc2) or "all-linear".
Megatron fuses q/k/v into `linear_qkv` and gate/up into `linear_fc1`. `lora_cfg.layout`:
  "per_projection" (PEFT's layout): one rank-r adapter per targeted HF projection (q, k, v, gate, up
      each its own A and B), so the q/k/v update has rank up to 3r; untargeted parts get no update.
  "fused" (Megatron's usual LoRA, the default): ONE adapter over the whole fused output as soon as any of
      its parts is targeted (a partial target such as only q_proj is logged as a warning: k and v then also
      get an update); q, k, v share one A, so their joint update has rank <= r.
`o_proj` / `down_proj` are single projections: both layouts are the same there.

Mixture of experts (Qwen3-MoE). The router (`mlp.router`, HF `mlp.gate`) never gets an adapter. gate/up/
down_proj name the MLP of the dense layers and, only with `lora_cfg.target_experts=True`, also every expert's
fc1 / fc2 (one adapter per expert, `...mlp.experts.local_experts.{j}.linear_fc1.lora.lora_a`); by default
experts stay frozen and un-adapted. Expert adapters (see adapter.py): A seeded by the GLOBAL expert index
(EP=2 equals EP=1), gradients reduced over the expert-data-parallel group (`allreduce=False` under EP > 1, as
Megatron's expert weights), no activation collective under expert-TP (the token dispatcher does them), saved
in distributed checkpoints under Megatron's expert keys with the global expert offset (any EP size loads
them). Only Megatron's SequentialMLP experts (local linears; the CPU path) take adapters: grouped-GEMM experts
(TEGroupedMLP / GroupedMLP, CUDA + Transformer Engine) with `target_experts=True` are a ValueError naming
`lora.target_experts`; attention and dense-layer LoRA work there as usual.

Mechanics. The adapter is a child module `lora` of the base layer (parameters `...linear_qkv.lora.lora_a`
/ `.lora.lora_b`: "lora_" in a name marks a LoRA parameter; base parameter names are unchanged, so name
maps and checkpoints of the base keep working) plus a forward hook that adds `adapter(x)` to the layer's
output. Every non-LoRA parameter of the chunk gets `requires_grad=False`. For Transformer Engine's fused
LayerNorm+Linear the layer is asked for its normalised input (`return_layernorm_output`) and the hook
strips it again, so the caller sees the usual `(output, bias)`. `sharded_state_dict` of a LoRA layer is
patched so that Megatron's distributed checkpointing saves the adapter with its real TP sharding.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from torch import nn

from opsd_megatron.config.lora_targets import HF_TO_MEGATRON, resolve_parts
from opsd_megatron.config.schema import LoraConfig, choices
from opsd_megatron.mcore import patches
from opsd_megatron.mcore.lora.adapter import COLUMN, ROW, LoRAAdapter
from opsd_megatron.mcore.models.builder import unwrap

log = logging.getLogger(__name__)

LAYOUTS = choices(LoraConfig, "layout")
_LORA_SUFFIXES = (".lora.lora_a", ".lora.lora_b")


@dataclass
class LoRASettings:
    """The LoRA knobs `apply_lora` reads (any object with these attributes works, e.g. config.LoraConfig)."""

    rank: int = 64
    """Adapter rank r."""
    alpha: float = 128.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input (training mode only)."""
    target_modules: list[str] = field(default_factory=lambda: list(HF_TO_MEGATRON))
    """HF or Megatron layer names, or "all-linear"."""
    seed: int = 1234
    """Seed of A's initialisation (with the global layer name: identical for any TP/PP layout)."""
    layout: str = "fused"
    """"fused" (one adapter per Megatron layer) or "per_projection" (PEFT's: one per q/k/v/gate/up)."""
    target_experts: bool = False
    """MoE: also adapt every expert's gate/up/down_proj named in target_modules (default: experts frozen)."""


def _parallel_mode(module: nn.Module) -> str | None:
    """'column' / 'row' for Megatron's (local or TE) tensor-parallel linear layers, else None."""

    if isinstance(module, ColumnParallelLinear):
        return COLUMN
    if isinstance(module, RowParallelLinear):
        return ROW
    mode = getattr(module, "parallel_mode", None)  # transformer_engine.pytorch.Linear / LayerNormLinear
    return mode if mode in (COLUMN, ROW) else None


def _is_te_layernorm_linear(module: nn.Module) -> bool:
    """A TE LayerNormLinear (it has a `layer_norm_weight`); its `return_layernorm_output*` flags must exist
    (registry: a TE that renamed them fails here instead of feeding the adapter the un-normalised input)."""
    if not hasattr(module, "layer_norm_weight"):
        return False
    patches.check_instance("te.return_layernorm_output", module)
    patches.check_instance("te.return_layernorm_output_gathered", module)
    return True


def global_module_name(chunk: nn.Module, name: str) -> str:
    """`decoder.layers.<local i>.x` -> `decoder.layers.<global i>.x` (uses the layer's `layer_number`)."""
    m = re.match(r"^(.*?layers\.)(\d+)(\..*)?$", name)
    if not m:
        return name

    layer = unwrap(chunk).get_submodule(f"{m.group(1)}{m.group(2)}")
    idx = getattr(layer, "layer_number", int(m.group(2)) + 1) - 1
    rest = m.group(3) or ""
    e = _LOCAL_EXPERT_RE.match(rest)
    if e:  # MoE: local expert j on EP rank k -> global expert k * E/ep + j (SequentialMLP's own offsets)
        experts = layer.get_submodule(e.group(1).strip(".")) if e.group(1).strip(".") else layer
        g = experts.ep_group.rank() * experts.num_local_experts + int(e.group(2))
        rest = f"{e.group(1)}local_experts.{g}{e.group(3)}"
    return f"{m.group(1)}{idx}{rest}"


_LOCAL_EXPERT_RE = re.compile(r"^(\..*?\.)local_experts\.(\d+)(.*)$")


def _expert_kind(name: str, module: nn.Module) -> str | None:
    """None for a non-expert layer; "local" for a Megatron ColumnParallelLinear / RowParallelLinear inside
    SequentialMLP (`...local_experts.{j}.linear_fc*`); "unsupported" for any other expert linear (grouped
    GEMM, Transformer Engine)."""
    # Transformer Engine's expert linears (TEGroupedLinear, TELinear) keep no `is_expert`: the name decides
    if not (getattr(module, "is_expert", False) or ".experts." in f".{name}"):
        return None

    local = isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and ".local_experts." in name
    return "local" if local else "unsupported"


# ---- forward hook --------------------------------------------------------------------------------------
def _lora_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """Add the adapter's update to output[0]; for TE LayerNorm+Linear also strip the layer-norm output."""
    adapter: LoRAAdapter = module.lora
    if getattr(module, "_lora_strip_ln_out", False):
        if getattr(module, "te_return_bias", False):  # (out, bias, ln_out)
            out, bias, x = output
        else:  # Megatron's TE wrapper: ((out, ln_out), None)
            (out, x), bias = output
    else:
        (out, bias), x = output, (args[0] if args else next(iter(kwargs.values())))
    if adapter.enabled:
        out = out + adapter(x)
    return out, bias


def apply_lora(model_chunks: list[nn.Module], lora_cfg) -> dict[str, LoRAAdapter]:
    """Attach adapters to the targeted layers of every chunk and freeze everything else.

    `lora_cfg`: anything with rank, alpha, dropout, target_modules (and optionally seed) — `LoRASettings`
    or `opsd_megatron.config.LoraConfig`. Call after loading the base weights and BEFORE wrapping the
    chunks in Megatron DDP / building the optimizer (DDP allocates grad buffers for trainable parameters
    at construction). Returns {"<chunk index>.<module name>": adapter}. No collective (A is initialised from
    a seeded full matrix on every rank).
    """
    rank, alpha = int(lora_cfg.rank), float(lora_cfg.alpha)
    dropout, seed = float(getattr(lora_cfg, "dropout", 0.0)), int(getattr(lora_cfg, "seed", 1234))
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {dropout}.")
    layout = str(getattr(lora_cfg, "layout", "fused"))
    if layout not in LAYOUTS:
        raise ValueError(f"lora.layout must be one of {list(LAYOUTS)}, got {layout!r}.")
    per_part = resolve_parts(lora_cfg.target_modules, warn=layout == "fused")
    targets = set(per_part)
    target_experts = bool(getattr(lora_cfg, "target_experts", False))
    if target_experts and not targets & {"linear_fc1", "linear_fc2"}:
        raise ValueError(
            "lora.target_experts=true needs an MLP projection (gate_proj, up_proj or down_proj) in "
            f"lora.target_modules, got {sorted(lora_cfg.target_modules)}."
        )
    skipped_experts = 0
    adapters: dict[str, LoRAAdapter] = {}
    for ci, chunk in enumerate(model_chunks):
        if any(c.__name__ == "DistributedDataParallel" for c in type(chunk).__mro__):
            raise RuntimeError("apply_lora must be called before the model chunks are wrapped in DDP.")
        if any(isinstance(m, LoRAAdapter) for m in chunk.modules()):
            raise RuntimeError("apply_lora was already applied to these model chunks.")
        for p in chunk.parameters():
            p.requires_grad_(False)
        for name, module in list(chunk.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in targets:
                continue
            expert = _expert_kind(name, module)
            if expert is not None and not target_experts:
                skipped_experts += 1
                continue
            if expert == "unsupported":
                raise ValueError(
                    f"lora.target_experts=true: the MoE expert layer {name} is a {type(module).__name__} "
                    "(grouped GEMM / Transformer Engine experts); expert adapters support Megatron's "
                    "SequentialMLP experts only (the CPU path). Set lora.target_experts=false: attention and "
                    "dense-layer MLP adapters work with any experts."
                )
            mode = _parallel_mode(module)
            if mode is None:
                raise TypeError(f"LoRA target {name} is a {type(module).__name__}, not a TP linear layer.")
            if mode == COLUMN and getattr(module, "gather_output", False):
                raise ValueError(f"LoRA target {name} gathers its output (gather_output=True): unsupported.")
            parts, groups = (None, 1)
            if layout == "per_projection" and mode == COLUMN:
                parts, groups = _projection_parts(module, leaf, per_part[leaf])
            module.lora = LoRAAdapter(
                mode,
                module.weight,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                tp_group=_tp_group(module),
                sequence_parallel=getattr(module, "sequence_parallel", False),
                seed=seed,
                name=global_module_name(chunk, name),
                parts=parts,
                groups=groups,
                expert=expert is not None and bool(getattr(module, "explicit_expert_comm", False)),
                stride=_fc1_stride(module, leaf),
            )
            if _is_te_layernorm_linear(module):
                module.return_layernorm_output = True
                module.return_layernorm_output_gathered = False
                module._lora_strip_ln_out = True
            module._lora_hook_handle = module.register_forward_hook(_lora_hook, with_kwargs=True)
            module.sharded_state_dict = _sharded_state_dict_with_lora.__get__(module)
            adapters[f"{ci}.{name}"] = module.lora
    if skipped_experts:
        log.info("LoRA: %d MoE expert projections left frozen (lora.target_experts=false)", skipped_experts)
    if not adapters:
        raise ValueError(f"lora.target_modules {sorted(targets)} matched no layer of the model.")
    return adapters


def _projection_parts(module: nn.Module, leaf: str, targeted: set[str]):
    """(parts, groups) of a column-parallel layer for the per_projection layout (see adapter.py):
    linear_qkv -> [q | k | v] per local query group; gated linear_fc1 -> [gate | up]; else None."""
    cfg = getattr(module, "config", None)
    tp = getattr(cfg, "tensor_model_parallel_size", 1) or 1
    if leaf == "linear_qkv" and cfg is not None:
        heads = cfg.num_attention_heads
        groups = cfg.num_query_groups or heads
        d = cfg.kv_channels or cfg.hidden_size // heads
        names, widths = ("q_proj", "k_proj", "v_proj"), ((heads // groups) * d, d, d)
        return tuple((n, w, n in targeted) for n, w in zip(names, widths)), groups // tp
    if leaf == "linear_fc1" and getattr(cfg, "gated_linear_unit", False):
        half = module.weight.shape[0] // 2
        return (("gate_proj", half, "gate_proj" in targeted), ("up_proj", half, "up_proj" in targeted)), 1
    return None, 1


def _fc1_stride(module: nn.Module, leaf: str) -> int:
    """TP partition stride of a layer's weight: 2 for a gated (SwiGLU) `linear_fc1`, whose TP rank r holds
    [gate shard r | up shard r] (Megatron's MLP builds it with stride 2 but records `partition_stride` on the
    weight only when it initialises it, i.e. not with perform_initialization=False as the trainer builds)."""
    gated = getattr(getattr(module, "config", None), "gated_linear_unit", False)
    return 2 if leaf == "linear_fc1" and gated else 1


def _tp_group(module: nn.Module):
    group = getattr(module, "tp_group", None)
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    return group


def iter_adapters(model_chunks) -> Iterator[tuple[str, nn.Module, LoRAAdapter]]:
    """(chunk-qualified base module name, base module, adapter) for every adapter."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for ci, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            if isinstance(getattr(module, "lora", None), LoRAAdapter):
                yield f"{ci}.{name}", module, module.lora


def has_lora(model_chunks) -> bool:
    return next(iter_adapters(model_chunks), None) is not None


@contextlib.contextmanager
def adapters_disabled(model_chunks):
    """Run the base model: every adapter is skipped (output bit-identical to the model without LoRA).
    No copy of any weight is made. Restores each adapter's previous state on exit."""
    saved = [(ad, ad.enabled) for _, _, ad in iter_adapters(model_chunks)]
    for ad, _ in saved:
        ad.enabled = False
    try:
        yield model_chunks
    finally:
        for ad, was in saved:
            ad.enabled = was


# ---- parameters, merge, state dicts ------------------------------------------------------------------
def is_lora_param_name(name: str) -> bool:
    return name.endswith(_LORA_SUFFIXES)


def trainable_named_parameters(model_chunks) -> list[tuple[str, torch.nn.Parameter]]:
    """[("<chunk>.<param name>", param)] of every parameter with requires_grad."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [
        (f"{ci}.{n}", p) for ci, c in enumerate(chunks) for n, p in c.named_parameters() if p.requires_grad
    ]


def adapter_sharded_state_dict(chunk: nn.Module) -> dict:
    """The adapter entries (`...lora.lora_a|lora_b` ShardedTensors) of `chunk`'s sharded state dict: what a
    LoRA training checkpoint saves of the model (the frozen base is referenced, not saved)."""
    return {k: v for k, v in chunk.sharded_state_dict().items() if k.endswith(_LORA_SUFFIXES)}


def lora_state_dict(model_chunks) -> dict[str, torch.Tensor]:
    """This rank's adapter shards: {"<chunk>.<module>.lora.lora_a|lora_b": detached tensor (shared)}."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return {
        f"{ci}.{n}": p.detach()
        for ci, c in enumerate(chunks)
        for n, p in c.named_parameters()
        if is_lora_param_name(n)
    }


@torch.no_grad()
def copy_named_tensors(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], what: str) -> None:
    """Copy `src` into the same-named tensors of `dst` in place; a missing, unexpected or misshapen entry is
    one error naming `what` (e.g. "LoRA state dict") and the tensor."""
    missing, unexpected = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or unexpected:
        raise KeyError(f"{what} mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    for n, t in dst.items():
        if t.shape != src[n].shape:
            got, want = tuple(src[n].shape), tuple(t.shape)
            raise ValueError(f"{what}: tensor {n} has shape {got}, expected {want}.")
        t.copy_(src[n])


def load_lora_state_dict(model_chunks, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `lora_state_dict` (same TP/PP layout); a missing or misshapen entry is an error."""
    copy_named_tensors(lora_state_dict(model_chunks), state, "LoRA state dict")


@torch.no_grad()
def merged_local_weight(module: nn.Module) -> torch.Tensor:
    """W_local + scale * B_local @ A_local (in fp32, cast back to W's dtype) for a LoRA layer; W_local
    itself (no copy) for any other layer. Local shard, same shape and TP layout as `module.weight`;
    the base weight is not modified. No collective."""
    adapter = getattr(module, "lora", None)
    w = module.weight
    if not isinstance(adapter, LoRAAdapter):
        return w
    return (w.float() + adapter.delta_weight()).to(w.dtype)


def merged_named_parameters(chunk: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`chunk.named_parameters()` for export: LoRA parameters left out, each LoRA layer's `weight`
    replaced by its merged local shard (`merged_local_weight`). Names and TP layout are the base model's."""
    merged = {}
    for name, module in chunk.named_modules():
        if isinstance(getattr(module, "lora", None), LoRAAdapter):
            merged[f"{name}.weight" if name else "weight"] = module
    for name, p in chunk.named_parameters():
        if is_lora_param_name(name):
            continue
        yield name, (merged_local_weight(merged[name]) if name in merged else p)


def lora_shard_hook(megatron_name: str, module: nn.Module, shard: torch.Tensor) -> torch.Tensor:
    """`shard_hook` for `opsd_megatron.mcore.conversion.export_hf_weights` / `save_hf_checkpoint`: the merged
    local shard for a LoRA layer's `weight`, the shard unchanged for every other parameter."""
    if megatron_name.endswith(".weight") and isinstance(getattr(module, "lora", None), LoRAAdapter):
        return merged_local_weight(module)
    return shard


def _sharded_state_dict_with_lora(self, prefix: str = "", sharded_offsets=(), metadata=None):
    """The base layer's sharded state dict with the adapter re-wrapped with its own TP sharding
    (column: `lora.lora_b` on axis 0, SwiGLU halves as for fc1's weight; row: `lora.lora_a` on axis 1)."""

    owner, attr = patches.target("megatron.make_sharded_tensors")
    make_sharded_tensors_for_checkpoint = getattr(owner, attr)
    sd = type(self).sharded_state_dict(self, prefix, sharded_offsets, metadata)
    ad: LoRAAdapter = self.lora
    local = {"lora_a": ad.lora_a, "lora_b": ad.lora_b}
    axis = {"lora_b": 0} if ad.parallel_mode == COLUMN else {"lora_a": 1}
    kwargs = {}
    if (
        metadata is not None and "dp_cp_group" in metadata
    ):  # Megatron resolves both groups when neither is given
        kwargs = {"tp_group": ad.tp_group, "dp_cp_group": metadata["dp_cp_group"]}
    # the registry checks the signature has tp_group / dp_cp_group (megatron-core 0.16.1 and 0.19.2 do)
    lsd = make_sharded_tensors_for_checkpoint(local, f"{prefix}lora.", axis, sharded_offsets, **kwargs)
    if ad.parallel_mode == COLUMN and getattr(ad.lora_b, "partition_stride", 1) == 2:
        key = f"{prefix}lora.lora_b"
        lsd[key] = apply_swiglu_sharded_factory(lsd[key], sharded_offsets)
    sd.update(lsd)
    return sd
