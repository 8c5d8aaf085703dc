"""Per-expert checkpoint names -> slices of the fused expert tensors transformers 5 keeps in memory (MoE).

transformers 5 holds a Qwen3-MoE layer's experts as two 3-D parameters, `mlp.experts.gate_up_proj`
[E, 2*f, h] (gate rows first, then up) and `mlp.experts.down_proj` [E, h, f], but checkpoints (and our
weight export) use the hub's per-expert names `mlp.experts.{e}.gate_proj.weight` [f, h], `...up_proj.weight`
[f, h], `...down_proj.weight` [h, f]. `fused_expert_target(name, params)` returns the view to copy into.
"""

from __future__ import annotations

import re

import torch

_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fused_expert_target(name: str, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The view of a fused expert parameter that the per-expert tensor `name` maps to, or None.

    Raises ValueError naming the tensor when the expert index is out of range.
    """
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
    fused = params.get(f"{prefix}.down_proj" if proj == "down_proj" else f"{prefix}.gate_up_proj")
    if fused is None or fused.dim() != 3:
        return None
    if not 0 <= expert < fused.shape[0]:
        raise ValueError(f"update_weights: tensor {name!r}: expert {expert} >= num_experts {fused.shape[0]}.")
    if proj == "down_proj":
        return fused[expert]
    f = fused.shape[1] // 2
    return fused[expert, :f] if proj == "gate_proj" else fused[expert, f:]
