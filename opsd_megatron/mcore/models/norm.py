"""RMSNorm for Megatron's local (non-Transformer-Engine) layer spec with sequence parallelism.

Megatron's `WrappedTorchNorm` refuses `sequence_parallel` because it does not mark its weight for the
tensor-parallel gradient all-reduce: with sequence parallelism each TP rank normalises only its slice of the
sequence, so its weight gradient is a partial sum. `SequenceParallelRMSNorm` is `torch.nn.RMSNorm` with
`weight.sequence_parallel = config.sequence_parallel`, which `finalize_model_grads` all-reduces over TP
(as it does for Transformer Engine's norms). Used by `builder.layer_spec` only when sequence parallelism
is on without Transformer Engine (the CPU path), for dense layer specs and MoE block specs alike.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.spec_utils import ModuleSpec


class SequenceParallelRMSNorm:
    """Factory with `WrappedTorchNorm`'s signature (Megatron's `build_module` calls it like a class)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.RMSNorm:
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"SequenceParallelRMSNorm: normalization {config.normalization!r} is not RMSNorm."
            )
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = bool(config.sequence_parallel)
        return norm


def replace_norms(spec, old, new):
    """Return a copy of a Megatron `ModuleSpec` tree with every `old` module class replaced by `new`."""

    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=new if spec.module is old else spec.module,
                                   submodules=replace_norms(spec.submodules, old, new))  # fmt: skip
    if spec is old:
        return new
    if isinstance(spec, (list, tuple)):  # a block spec's per-layer specs (MoE models)
        return type(spec)(replace_norms(s, old, new) for s in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: replace_norms(getattr(spec, f.name), old, new)
                                            for f in dataclasses.fields(spec) if f.init})  # fmt: skip
    return spec
