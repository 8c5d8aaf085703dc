"""Which refresh a LoRA run's engines get (`rollout.lora_refresh`), decided once from the config; torch-free.

    mode, why = lora_refresh_choice(cfg, moe=False)  # ("adapters", None) or ("merged", "rollout.engine=hf")
    max_lora_rank(cfg.lora.rank)                      # vLLM's smallest allowed max_lora_rank >= the rank

adapters: the engine is built with vLLM's LoRA (`enable_lora`, `max_lora_rank`, `max_loras=1`) over the
frozen base, and each refresh hands it the current adapters (rollout/refresh/lora_adapters.py); merged: the
LoRA-merged full weights (rollout/refresh/syncer.py). `why` says why adapters cannot be served (None when
they can): `auto` then falls back to merged (logged once by run/setup.py), an explicit `adapters` is a
ConfigError naming the key (config/checks.py).
"""

from __future__ import annotations

from typing import Any

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's allowed `max_lora_rank` values (vllm/config/lora.py `MaxLoRARanks`, 0.32)."""


def max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds a rank-`rank` adapter."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def adapters_blocker(cfg: Any, moe: bool) -> str | None:
    """Why this run's engines cannot serve LoRA adapters (None: they can)."""
    r, lo = cfg.rollout, cfg.lora
    if not lo.enabled:
        return "lora.enabled is false (no adapters to serve)"
    if r.engine != "vllm":
        return f"rollout.engine={r.engine} serves no LoRA adapters (vLLM only)"
    if r.placement != "colocated":
        return f"rollout.placement={r.placement} sends its engines full weights over its own link"
    if lo.rank > VLLM_LORA_RANKS[-1]:
        return f"lora.rank={lo.rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}"
    if moe:  # expert adapters: vLLM's LoRA covers no fused experts here; attention-only: not verified
        return "the model is a mixture of experts (vLLM LoRA on its experts is not covered)"
    return None


def lora_refresh_choice(cfg: Any, moe: bool) -> tuple[str, str | None]:
    """(mode, why): mode "adapters" or "merged" for `rollout.lora_refresh` ("auto" decided here); `why`
    is the reason adapters cannot be served (None when they can or the run has no LoRA)."""
    if not cfg.lora.enabled:
        return "merged", None
    why = adapters_blocker(cfg, moe)
    if cfg.rollout.lora_refresh == "merged":
        return "merged", why
    return ("adapters", None) if why is None else ("merged", why)
