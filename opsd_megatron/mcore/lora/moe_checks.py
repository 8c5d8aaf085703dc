"""The one LoRA start-up check that depends on this machine rather than on the config: expert adapters
(`lora.target_experts`) on grouped-GEMM experts.

    check_lora_backend(cfg)     # after validate_model, before the model is built

With CUDA and Transformer Engine megatron-core builds the experts as one grouped GEMM (TEGroupedMLP), which
takes no expert adapters; `apply_lora` would refuse them only after the model is built and loaded, this says
so at start-up as a `ConfigError` naming the key. The checks that need only the config or the model's
config.json live in `opsd_megatron.config.checks` (torch-free).
"""

from __future__ import annotations

from typing import Any

import torch

from opsd_megatron.config.schema import ConfigError
from opsd_megatron.mcore.models.builder import have_te


def check_lora_backend(cfg: Any) -> None:
    """ConfigError naming `lora.target_experts` when expert adapters meet grouped-GEMM experts (CUDA + TE);
    a dense model with target_experts is refused earlier, by `config.validate_model`."""
    if not (cfg.lora.enabled and cfg.lora.target_experts):
        return
    if torch.cuda.is_available() and have_te():
        raise ConfigError(
            "config key 'lora.target_experts': is true, but with CUDA and Transformer Engine the experts are "
            "a grouped GEMM (TEGroupedMLP), which takes no expert adapters; set lora.target_experts: false "
            "(attention and dense-layer MLP adapters work)."
        )
