"""The layer names `lora.target_modules` accepts and the Megatron layers they land on (torch-free: the config
checks and `mcore.lora` both read it).

    resolve_targets(["q_proj", "v_proj"])     # {"linear_qkv"} (a partial fused target is logged)
    resolve_parts(["gate", "down_proj"])      # {"linear_fc1": {"gate_proj"}, "linear_fc2": {"down_proj"}}

HF names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, with or without `_proj`), Megatron names
(linear_qkv linear_proj linear_fc1 linear_fc2) or "all-linear". Megatron fuses q/k/v into `linear_qkv` and
gate/up into `linear_fc1`; see `opsd_megatron.mcore.lora.api` for what each layout does with a fused layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

# HF projection name -> the Megatron layer that holds it
HF_TO_MEGATRON = {
    "q_proj": "linear_qkv",
    "k_proj": "linear_qkv",
    "v_proj": "linear_qkv",
    "o_proj": "linear_proj",
    "gate_proj": "linear_fc1",
    "up_proj": "linear_fc1",
    "down_proj": "linear_fc2",
}
FUSED_PARTS = {"linear_qkv": {"q_proj", "k_proj", "v_proj"}, "linear_fc1": {"gate_proj", "up_proj"}}
MEGATRON_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
MLP_TARGETS = frozenset({"linear_fc1", "linear_fc2"})


def resolve_targets(target_modules: Iterable[str]) -> set[str]:
    """HF / Megatron names -> the set of Megatron layer names that get an adapter (see module docstring)."""
    return set(resolve_parts(target_modules, warn=True))


def resolve_parts(target_modules: Iterable[str], warn: bool = False) -> dict[str, set[str]]:
    """HF / Megatron names -> {Megatron layer: the HF projections of it that were named}."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not names:
        raise ValueError("lora.target_modules is empty: name at least one layer (e.g. q_proj, v_proj).")
    hf_parts: set[str] = set()
    out: set[str] = set()
    for raw in names:
        n = str(raw).strip()
        if n in ("all-linear", "all_linear", "all"):
            out.update(MEGATRON_TARGETS)
            hf_parts.update(HF_TO_MEGATRON)
            continue
        if n in MEGATRON_TARGETS:
            out.add(n)
            hf_parts.update(p for p, m in HF_TO_MEGATRON.items() if m == n)
            continue
        hf = n if n.endswith("_proj") else f"{n}_proj"
        if hf not in HF_TO_MEGATRON:
            raise ValueError(
                f"lora.target_modules: unknown layer {raw!r}; expected one of "
                f"{sorted(HF_TO_MEGATRON)}, {list(MEGATRON_TARGETS)} or 'all-linear'."
            )
        hf_parts.add(hf)
        out.add(HF_TO_MEGATRON[hf])
    for fused, parts in FUSED_PARTS.items():
        if warn and fused in out and not parts <= hf_parts:
            log.warning(
                "lora.target_modules names %s but not %s: Megatron fuses them in %s, which gets one adapter "
                "over the whole fused layer (layout: fused).",
                sorted(parts & hf_parts),
                sorted(parts - hf_parts),
                fused,
            )
    return {m: {p for p in hf_parts if HF_TO_MEGATRON[p] == m} for m in out}


def names_mlp(target_modules: Iterable[str]) -> bool | None:
    """Whether target_modules names an MLP projection; None for an unknown name (apply_lora reports it)."""
    try:
        return bool(set(resolve_parts(target_modules)) & MLP_TARGETS)
    except ValueError:
        return None
