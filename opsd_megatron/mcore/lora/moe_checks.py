"""Start-up checks of LoRA on mixture-of-experts models (`lora.target_experts`, `lora.export_peft`).

    check_lora_config(cfg)                 # from config_checks.validate: the config alone
    check_lora_model(cfg, hf_config)       # from config_checks.validate_model: against config.json

Each failure is one `ConfigError` naming the key, raised before any model is built. See lora/api.py for
what `target_experts` does and lora/peft_export.py for the PEFT limits on MoE models.
"""

from __future__ import annotations

from typing import Any

_MLP_TARGETS = {"linear_fc1", "linear_fc2"}


def _fail(key: str, msg: str) -> None:
    from opsd_megatron.config import ConfigError

    raise ConfigError(f"config key '{key}': {msg}")


def _mlp_targeted(target_modules) -> bool | None:
    """Whether target_modules names an MLP projection; None for an unknown name (apply_lora reports it)."""
    from opsd_megatron.mcore.lora.api import resolve_parts

    try:
        return bool(set(resolve_parts(target_modules)) & _MLP_TARGETS)
    except ValueError:
        return None


def check_lora_config(cfg: Any) -> None:
    """`lora.target_experts` against the rest of the config (no model needed)."""
    lo = cfg.lora
    if not lo.target_experts:
        return
    if not lo.enabled:
        _fail("lora.target_experts", "is true but lora.enabled is false (set both, or neither).")
    etp = cfg.parallel.etp or cfg.parallel.tp
    if etp > 1 and etp != cfg.parallel.tp:
        _fail(
            "parallel.etp",
            f"is {etp} with lora.target_experts, but parallel.tp is {cfg.parallel.tp}: an expert adapter's "
            "replicated factor (A of fc1, B of fc2) lives on every expert-TP rank, and Megatron's grad-norm "
            "counts a replicated parameter once per TP group, not per expert-TP group. Use expert-TP 1 or "
            "equal to parallel.tp.",
        )
    if _mlp_targeted(lo.target_modules) is False:
        _fail(
            "lora.target_experts",
            "is true, but lora.target_modules names no MLP projection (gate_proj, up_proj, down_proj) to "
            f"adapt in the experts: {list(lo.target_modules)}.",
        )


def _dense_layers(hf_config: dict) -> list[int]:
    """Layers of a Qwen3-MoE config.json with a dense MLP (`mlp_only_layers`, `decoder_sparse_step`)."""
    n = int(hf_config.get("num_hidden_layers") or 0)
    only = set(hf_config.get("mlp_only_layers") or [])
    step = int(hf_config.get("decoder_sparse_step") or 1)
    return [i for i in range(n) if i in only or (i + 1) % step != 0]


def check_lora_model(cfg: Any, hf_config: dict) -> None:
    """LoRA against the model's config.json and this machine (grouped-GEMM experts)."""
    lo = cfg.lora
    if not lo.enabled:
        return
    from opsd_megatron.mcore.models.hf_config import hf_num_experts

    experts = hf_num_experts(hf_config)
    if lo.target_experts and not experts:
        _fail("lora.target_experts", "is true, but the model has no experts (not a mixture-of-experts).")
    if not experts:
        return
    dense = _dense_layers(hf_config)
    if dense and lo.export_peft and cfg.checkpoint.export_hf and _mlp_targeted(lo.target_modules):
        _fail(
            "lora.export_peft",
            f"the model's layers {dense[:8]} have a dense MLP, and lora.target_modules adapts MLP "
            "projections: peft (with transformers 5) maps gate_proj/up_proj/down_proj of a "
            "mixture-of-experts model to its experts, so a PEFT adapter cannot hold the dense layers' MLP "
            "adapters. Set lora.export_peft: false (the merged HF export still holds them) or leave "
            "gate_proj/up_proj/down_proj out of lora.target_modules.",
        )
    if lo.target_experts:
        import torch

        if torch.cuda.is_available():
            from opsd_megatron.mcore.models.builder import have_te

            if have_te():
                _fail(
                    "lora.target_experts",
                    "is true, but with CUDA and Transformer Engine the experts are a grouped GEMM "
                    "(TEGroupedMLP), which takes no expert adapters; set lora.target_experts: false "
                    "(attention and dense-layer MLP adapters work).",
                )
