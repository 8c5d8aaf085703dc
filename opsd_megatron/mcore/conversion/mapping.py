"""Declarative Megatron <-> Hugging Face name maps (one source of truth for conversion and weight sync).

A Megatron parameter maps to one or more HF tensors through one named transform:

    transform     Megatron local shard on TP rank r            HF tensor(s)
    replicated    full tensor                                  same tensor (norms)
    row           W[:, r*n/tp:(r+1)*n/tp]                      W [out, in]  (linear_proj, linear_fc2)
    vocab         rows [r*Vp/tp, (r+1)*Vp/tp) of padded W      W [V, h]     (embedding, output layer)
    qkv           per query group g of rank r: [q_g; k_g; v_g]  q, k, v      (weight [*, h] and bias [*])
    fc1           [gate_r; up_r] (each half split over TP)     gate, up     (SwiGLU linear_fc1)
    expert_fc1    fc1 of one expert, split over expert-TP      experts.{g}.gate_proj, .up_proj
    expert_row    row of one expert, split over expert-TP      experts.{g}.down_proj

MoE (Qwen3-MoE): the router `mlp.router.weight` [E, h] is `mlp.gate.weight` (replicated); local expert j of
EP rank e is global expert g = e * E/ep + j (`models.moe.global_expert`); Megatron names of expert
parameters carry the GLOBAL index (`decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`), so
the names are the same at every EP size. Both Megatron spellings are mapped: SequentialMLP
(`local_experts.{j}.linear_fc1.weight`) and the TE grouped GEMM (`linear_fc1.weight{j}`).

`param_maps(model_chunks)` gives, for every parameter of this rank's chunks (parameters with `lora_` in the
name skipped; a `.base_layer.` segment of an adapter wrapper ignored for naming), a
`ParamMap(megatron_name, local_name, chunk_index, hf_names, transform, export)`;
`hf_shape(name, spec)` the full HF shape. A LoRA merge or any other consumer can reuse these plain records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron.core import parallel_state as mps

from opsd_megatron.mcore.models.builder import model_info, unwrap
from opsd_megatron.mcore.models.hf_config import SUPPORTED_ARCHITECTURES, ModelSpec

# Megatron suffix inside a transformer layer -> (HF suffixes inside model.layers.{i}., transform).
# Local-spec and Transformer-Engine-spec spellings are both listed (TE fuses the norms into the linears).
_LAYER_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    "self_attention.linear_qkv.bias": (
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        "qkv",
    ),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "replicated"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "replicated"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "row"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "row"),
}
_GLOBAL_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "embedding.word_embeddings.weight": (("model.embed_tokens.weight",), "vocab"),
    "decoder.final_layernorm.weight": (("model.norm.weight",), "replicated"),
    "output_layer.weight": (("lm_head.weight",), "vocab"),
}
# The three supported architectures share one map; which entries occur depends on the config
# (qkv bias: Qwen2; q/k norm: Qwen3; output_layer: untied embeddings).
_LAYER_MAP["mlp.router.weight"] = (("mlp.gate.weight",), "replicated")
NAME_MAPS: dict[str, tuple[dict, dict]] = {
    arch: (_GLOBAL_MAP, _LAYER_MAP) for arch in SUPPORTED_ARCHITECTURES
}
# Expert parameters: Megatron suffix after the expert index -> (HF suffixes after `mlp.experts.{g}.`,
# transform).
_EXPERT_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "linear_fc1.weight": (("gate_proj.weight", "up_proj.weight"), "expert_fc1"),
    "linear_fc2.weight": (("down_proj.weight",), "expert_row"),
}
TP_DIM = {"replicated": None, "row": 1, "vocab": 0, "qkv": 0, "fc1": 0, "expert_fc1": 0, "expert_row": 1}
EXPERT_TRANSFORMS = ("expert_fc1", "expert_row")  # split over expert-TP (not TP), placed by EP rank

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# SequentialMLP: mlp.experts.local_experts.{j}.linear_fc1.weight;
# TE grouped GEMM: mlp.experts.linear_fc1.weight{j}
_SEQ_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_GROUPED_EXPERT_RE = re.compile(r"^mlp\.experts\.(linear_fc[12]\.weight)(\d+)$")


def expert_index(layer_suffix: str) -> tuple[int, str] | None:
    """(expert index, `linear_fc1.weight` / `linear_fc2.weight`) of an expert parameter suffix, else None."""
    m = _SEQ_EXPERT_RE.match(layer_suffix)
    if m:
        return int(m.group(1)), m.group(2)
    m = _GROUPED_EXPERT_RE.match(layer_suffix)
    if m:
        return int(m.group(2)), m.group(1)
    return None


def _with_expert(layer_suffix: str, expert: int) -> str:
    """The same expert parameter suffix with its expert index replaced."""
    m = _SEQ_EXPERT_RE.match(layer_suffix)
    if m:
        return f"mlp.experts.local_experts.{expert}.{m.group(2)}"
    m = _GROUPED_EXPERT_RE.match(layer_suffix)
    return f"mlp.experts.{m.group(1)}{expert}"


@dataclass(frozen=True)
class ParamMap:
    """How one Megatron parameter of this rank relates to HF tensors."""

    megatron_name: str  # global name: layer index = global layer number - 1
    local_name: str  # name inside its chunk's named_parameters()
    chunk_index: int
    hf_names: tuple[str, ...]
    transform: str  # key of TP_DIM
    export: bool = True  # False for a tied output layer (a copy of the embedding)
    expert: int | None = None  # global expert index of an expert parameter (MoE), else None

    @property
    def layer(self) -> int | None:
        m = _LAYER_RE.match(self.megatron_name)
        return int(m.group(1)) if m else None

    def sort_key(self) -> tuple[int, int]:
        """Global order: embedding, layers by index, final norm, output layer."""
        if self.megatron_name.startswith("embedding."):
            return (0, 0)
        if self.layer is not None:
            return (1, self.layer)
        return (2, 0) if "final_layernorm" in self.megatron_name else (3, 0)


def map_name(megatron_name: str, spec: ModelSpec) -> tuple[tuple[str, ...], str, bool]:
    """(hf_names, transform, export) for a global Megatron parameter name; KeyError if unmapped."""
    global_map, layer_map = NAME_MAPS[spec.architecture]
    if megatron_name == "output_layer.weight" and spec.tie_word_embeddings:
        return ("model.embed_tokens.weight",), "vocab", False
    if megatron_name in global_map:
        names, transform = global_map[megatron_name]
        return names, transform, True
    m = _LAYER_RE.match(megatron_name)
    if m and m.group(2) in layer_map:
        names, transform = layer_map[m.group(2)]
        return tuple(f"model.layers.{m.group(1)}.{n}" for n in names), transform, True
    ex = expert_index(m.group(2)) if m and spec.is_moe else None
    if ex is not None:
        names, transform = _EXPERT_MAP[ex[1]]
        prefix = f"model.layers.{m.group(1)}.mlp.experts.{ex[0]}."
        return tuple(prefix + n for n in names), transform, True
    raise KeyError(
        f"Megatron parameter {megatron_name!r} has no Hugging Face mapping for {spec.architecture}."
    )


def _layer_offsets(chunk) -> dict[int, int]:
    """Local layer index -> global layer index (from each TransformerLayer's 1-based `layer_number`)."""
    decoder = getattr(chunk, "decoder", None)
    if decoder is None:
        return {}
    return {j: layer.layer_number - 1 for j, layer in enumerate(decoder.layers)}


def param_maps(model_chunks: list) -> list[ParamMap]:
    """`ParamMap` for every (non-LoRA) parameter of this rank's chunks, in named_parameters order."""
    info = model_info(model_chunks)
    spec = info.spec
    ep_rank = 0
    if spec.is_moe and info.ep > 1:
        ep_rank = mps.get_expert_model_parallel_rank()
    out = []
    for ci, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        offsets = _layer_offsets(model)
        for local_name, _ in model.named_parameters():
            if "lora_" in local_name:
                continue
            name = local_name.replace(".base_layer.", ".")  # adapter wrappers keep the base weight here
            m = _LAYER_RE.match(name)
            expert = None
            if m:
                suffix = m.group(2)
                ex = expert_index(suffix) if spec.is_moe else None
                if ex is not None:  # local expert index -> global (the name is then EP-independent)
                    expert = ex[0] + ep_rank * (spec.num_experts // info.ep)
                    suffix = _with_expert(suffix, expert)
                name = f"decoder.layers.{offsets[int(m.group(1))]}.{suffix}"
            hf_names, transform, export = map_name(name, spec)
            out.append(ParamMap(name, local_name, ci, hf_names, transform, export, expert))
    return out


def expert_hf_names(hf_names: tuple[str, ...], expert: int) -> tuple[str, ...]:
    """The HF names of another expert: `...mlp.experts.3.up_proj.weight` -> `...mlp.experts.{expert}....`."""
    return tuple(re.sub(r"\.mlp\.experts\.\d+\.", f".mlp.experts.{expert}.", n) for n in hf_names)


_EXPERT_HF_RE = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


def hf_shape(hf_name: str, spec: ModelSpec) -> tuple[int, ...]:
    """Full shape of an HF tensor of this architecture (for shape checks and PP broadcasts)."""
    h, hd, f = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    m = _EXPERT_HF_RE.search(hf_name) if spec.is_moe else None
    if m:
        fe = spec.moe_ffn_hidden_size
        return (h, fe) if m.group(1) == "down_proj" else (fe, h)
    if spec.is_moe and hf_name.endswith("mlp.gate.weight"):
        return (spec.num_experts, h)
    suffix_shapes = {
        "embed_tokens.weight": (spec.vocab_size, h),
        "lm_head.weight": (spec.vocab_size, h),
        "q_proj.weight": (q, h),
        "k_proj.weight": (kv, h),
        "v_proj.weight": (kv, h),
        "q_proj.bias": (q,),
        "k_proj.bias": (kv,),
        "v_proj.bias": (kv,),
        "o_proj.weight": (h, q),
        "q_norm.weight": (hd,),
        "k_norm.weight": (hd,),
        "gate_proj.weight": (f, h),
        "up_proj.weight": (f, h),
        "down_proj.weight": (h, f),
        "layernorm.weight": (h,),
        "norm.weight": (h,),
    }
    for suffix, shape in suffix_shapes.items():
        if hf_name.endswith(suffix):
            return shape
    raise KeyError(f"no known shape for HF tensor {hf_name!r}")
