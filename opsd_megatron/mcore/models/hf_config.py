"""Read a Hugging Face `config.json` into the few facts a Megatron GPT model needs (`ModelSpec`).

Supported `architectures`: LlamaForCausalLM (Llama 3.x, `rope_scaling` type llama3), Qwen2ForCausalLM
(Qwen2/2.5: qkv bias), Qwen3ForCausalLM (dense: q/k RMSNorm, head_dim may differ from hidden/heads),
Qwen3MoeForCausalLM (Qwen3 attention + mixture-of-experts MLPs: `num_experts` (alias `num_local_experts`),
`num_experts_per_tok`, `moe_intermediate_size`, `norm_topk_prob`, `decoder_sparse_step`, `mlp_only_layers`;
a bias-free softmax router; no shared experts).
Both the transformers-4 (`rope_theta` + `rope_scaling`) and transformers-5 (`rope_parameters`) spellings
are understood, so hub checkpoints and freshly saved ones read the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from opsd_megatron.mcore.layout import hf_dense_mlp_layers, hf_num_experts

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts from an HF config. Shapes: q = heads*head_dim, kv = kv_heads*head_dim."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int  # true (HF) vocabulary size; Megatron pads it internally
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # = Megatron's num_query_groups
    head_dim: int  # = Megatron's kv_channels
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3 scaling parameters or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    # Mixture of experts (num_experts == 0: dense model).
    num_experts: int = 0
    moe_topk: int = 0  # experts per token
    moe_ffn_hidden_size: int = 0  # per-expert intermediate size
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    moe_layers: tuple[int, ...] = ()  # 0-based indices of the layers with an MoE MLP (others dense)
    router_aux_loss_coef: float = 0.0  # the HF config's value (informational; training uses moe.* config)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict:
        return asdict(self)


def load_hf_config_dict(hf_config_or_dir: Any) -> dict:
    """A plain dict from a directory / config.json path / dict / `transformers.PretrainedConfig`."""
    if isinstance(hf_config_or_dir, dict):
        return dict(hf_config_or_dir)
    if isinstance(hf_config_or_dir, (str, Path)):
        p = Path(hf_config_or_dir)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"HF config file {p} does not exist (expected a model directory).")
        return json.loads(p.read_text())
    if hasattr(hf_config_or_dir, "to_dict"):
        return hf_config_or_dir.to_dict()
    raise TypeError(
        f"hf_config_or_dir must be a directory, a config.json path, a dict or a PretrainedConfig, "
        f"got {type(hf_config_or_dir).__name__}."
    )


def parse_hf_config(hf_config_or_dir: Any) -> tuple[ModelSpec, dict]:
    """(ModelSpec, raw config dict). Raises ValueError naming the field for unsupported configs."""
    cfg = load_hf_config_dict(hf_config_or_dir)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"HF config 'architectures' value {archs!r} is not supported; supported architectures are: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"HF config rope type {rope_type!r} is not supported (expected 'default' or 'llama3')."
        )
    scaling = None
    if rope_type == "llama3":
        scaling = {
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(rope.get("original_max_position_embeddings", 8192)),
        }
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"HF config 'hidden_act' is {cfg.get('hidden_act')!r}; only 'silu' is supported.")
    if arch == "LlamaForCausalLM" and cfg.get("mlp_bias"):
        raise ValueError("HF config 'mlp_bias' is true; only bias-free MLPs are supported.")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    spec = ModelSpec(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        **(_moe_fields(cfg) if arch in MOE_ARCHITECTURES else {}),
    )
    return spec, cfg


def _moe_fields(cfg: dict) -> dict:
    """MoE facts of a Qwen3-MoE config (which layers are sparse: `layout.hf_dense_mlp_layers`)."""
    experts = hf_num_experts(cfg)
    if not experts or int(experts) <= 0:
        raise ValueError("HF config 'num_experts' must be a positive integer for Qwen3MoeForCausalLM.")
    experts = int(experts)
    topk = int(cfg.get("num_experts_per_tok", 8))
    if not 0 < topk <= experts:
        raise ValueError(f"HF config 'num_experts_per_tok' ({topk}) must be in [1, num_experts={experts}].")
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError(
            "HF config 'shared_expert_intermediate_size' is set: shared experts are not supported."
        )
    dense = set(hf_dense_mlp_layers(cfg))
    layers = int(cfg["num_hidden_layers"])
    return dict(
        num_experts=experts,
        moe_topk=topk,
        moe_ffn_hidden_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=tuple(i for i in range(layers) if i not in dense),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0),
    )


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2] (fp32) exactly as transformers computes them (incl. llama3)."""
    dim = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if spec.rope_scaling is None:
        return inv
    s = spec.rope_scaling
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    inv_llama = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_llama)
