"""Tensor-parallel parameter attributes for models built without Megatron's weight initialisation.

megatron-core 0.16.1 sets `tensor_model_parallel` / `partition_dim` / `partition_stride` on the weights of
`ColumnParallelLinear`, `RowParallelLinear` and `VocabParallelEmbedding` only inside its initialisers
(`_initialize_affine_weight_cpu/gpu`), i.e. only with `perform_initialization=True`. `build_model(...,
perform_initialization=False)` (every model that is then loaded from a checkpoint) therefore left them
unset, and Megatron's optimizer took every TP-split weight for a TP duplicate: the gradient norm (and with
it clipping) counted only TP rank 0's shards (measured at TP2 on the tiny Qwen3-MoE: 1.206 instead of
1.544). `mark_tensor_parallel_weights` sets the attributes Megatron's initialisers would have set (a
weight that already has them is left alone). No collectives.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import layers


def mark_tensor_parallel_weights(model: torch.nn.Module) -> int:
    """Mark the weights of Megatron's own TP-split layers in `model` as tensor-parallel (partition dim 0
    for column-parallel layers and the vocabulary-parallel embedding, 1 for row-parallel layers; stride 2
    for a gated `linear_fc1`, whose rank shard is [gate shard | up shard], as Megatron's MLP builds it, else
    1). Returns how many weights were marked."""

    dims = (
        (layers.ColumnParallelLinear, 0),
        (layers.VocabParallelEmbedding, 0),
        (layers.RowParallelLinear, 1),
    )
    gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    marked = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or hasattr(weight, "tensor_model_parallel"):
            continue
        stride = 2 if gated and name.endswith("linear_fc1") else 1
        for cls, dim in dims:
            if isinstance(module, cls):
                layers.set_tensor_model_parallel_attributes(weight, True, dim, stride)
                marked += 1
                break
    return marked
