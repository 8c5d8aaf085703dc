"""TP-aware LoRA on Megatron-core linear layers (fused QKV and gate/up included); see `api.py`.

    from opsd_megatron.mcore.lora import apply_lora, adapters_disabled, merged_named_parameters
    apply_lora(chunks, cfg.lora)            # freezes the base, adds `...linear_*.lora.lora_{a,b}`
    with adapters_disabled(chunks): ...     # base model = the "adapters-off" teacher, zero extra memory
    save_peft_adapter(chunks, out_dir, cfg.lora, base_model=path)   # PEFT adapter dir (collective)

`cfg.lora.layout`: "per_projection" (PEFT's: q, k, v, gate, up each their own rank-r adapter) or "fused"
(one adapter per fused Megatron layer); see `api.py` and `adapter.py`. Mixture-of-experts models: attention
and dense-layer MLPs by default, never the router; `cfg.lora.target_experts` adds one adapter per expert
(api.py "Mixture of experts"; start-up checks in `opsd_megatron.config.checks`, the
machine-dependent one in `moe_checks.py`).

Importing this package needs neither CUDA nor Transformer Engine nor vLLM.
"""

from opsd_megatron.config.lora_targets import HF_TO_MEGATRON, resolve_parts, resolve_targets
from opsd_megatron.mcore.lora.adapter import LoRAAdapter
from opsd_megatron.mcore.lora.api import (
    LAYOUTS,
    LoRASettings,
    adapter_sharded_state_dict,
    adapters_disabled,
    apply_lora,
    global_module_name,
    has_lora,
    is_lora_param_name,
    iter_adapters,
    load_lora_state_dict,
    lora_shard_hook,
    lora_state_dict,
    merged_local_weight,
    merged_named_parameters,
    trainable_named_parameters,
)
from opsd_megatron.mcore.lora.peft_export import peft_adapter_tensors, save_peft_adapter

__all__ = [
    "HF_TO_MEGATRON",
    "LAYOUTS",
    "LoRAAdapter",
    "LoRASettings",
    "adapter_sharded_state_dict",
    "adapters_disabled",
    "apply_lora",
    "global_module_name",
    "has_lora",
    "is_lora_param_name",
    "iter_adapters",
    "load_lora_state_dict",
    "lora_shard_hook",
    "lora_state_dict",
    "merged_local_weight",
    "merged_named_parameters",
    "peft_adapter_tensors",
    "resolve_parts",
    "resolve_targets",
    "save_peft_adapter",
    "trainable_named_parameters",
]
