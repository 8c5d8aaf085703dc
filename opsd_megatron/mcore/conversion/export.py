"""Stream full HF-named tensors out of a TP x PP Megatron model: `export_hf_weights(model_chunks)`.

    for hf_name, tensor in export_hf_weights(chunks):   # a collective: every rank of the model must iterate
        ...

Order: embedding, layers 0..L-1, final norm, lm_head. For each Megatron parameter, the PP stage owning it
(1) applies `shard_hook(megatron_name, module, local_shard)` if given (e.g. LoRA merge: W + s * B @ A; the
result must keep the shard's shape; it is cast back to the parameter dtype),
(2) all-gathers the shards over its TP group, (3) applies the named transform -> full HF tensors; then
(4) with PP > 1, each HF tensor is broadcast from the owning stage over the PP group, so every rank yields
every tensor (same dtype as the parameter). Collectives per parameter: TP all-gather (owner stage), PP
broadcast per HF tensor. One all_gather_object over PP at the start (which stage owns what).
MoE: an expert parameter is gathered over the expert-TP group instead of TP, then its HF tensors are
all-gathered over the expert-parallel group (every EP rank holds a different expert at the same local
index), so every rank yields all E experts; the experts of one layer are yielded together with that layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mps

from opsd_megatron.mcore.conversion.mapping import (
    EXPERT_TRANSFORMS,
    TP_DIM,
    ParamMap,
    expert_hf_names,
    hf_shape,
    param_maps,
)
from opsd_megatron.mcore.conversion.transforms import shards_to_hf
from opsd_megatron.mcore.models.builder import model_info, unwrap

ShardHook = Callable[[str, torch.nn.Module, torch.Tensor], torch.Tensor]


def _owner_module(chunk: torch.nn.Module, local_name: str) -> torch.nn.Module:
    return chunk.get_submodule(local_name.rsplit(".", 1)[0]) if "." in local_name else chunk


def _gather_tp(shard: torch.Tensor, tp_group, tp: int) -> list[torch.Tensor]:
    if tp == 1:
        return [shard]
    shard = shard.contiguous()
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard, group=tp_group)
    return parts


def export_hf_weights(
    model_chunks: list, *, shard_hook: ShardHook | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for the whole model on every rank (see module docstring).

    The yielded tensors are fresh (safe to keep); LoRA parameters (`lora_` in the name) are skipped and
    a tied output layer is not exported twice. All ranks of the TP x PP model must consume the iterator
    to the end (it contains collectives).
    """

    info = model_info(model_chunks)
    spec = info.spec
    tp_group, pp_group = mps.get_tensor_model_parallel_group(), mps.get_pipeline_model_parallel_group()
    tp, pp = mps.get_tensor_model_parallel_world_size(), mps.get_pipeline_model_parallel_world_size()
    pp_rank = mps.get_pipeline_model_parallel_rank()
    ep, ep_group, ep_rank, etp, etp_group = 1, None, 0, tp, tp_group
    if spec.is_moe:
        ep, ep_rank = mps.get_expert_model_parallel_world_size(), mps.get_expert_model_parallel_rank()
        ep_group = mps.get_expert_model_parallel_group()
        etp, etp_group = mps.get_expert_tensor_parallel_world_size(), mps.get_expert_tensor_parallel_group()
    n_local = spec.num_experts // ep if spec.is_moe else 0
    mine = [pm for pm in param_maps(model_chunks) if pm.export]
    params = {}
    for ci, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        for name, p in model.named_parameters():
            params[(ci, name)] = (model, p)

    # Which stage owns each parameter, and the global order.
    if pp > 1:
        lists: list = [None] * pp
        payload = [
            (
                pm.megatron_name,
                pm.hf_names,
                pm.transform,
                str(params[(pm.chunk_index, pm.local_name)][1].dtype),
            )
            for pm in mine
        ]
        dist.all_gather_object(lists, payload, group=pp_group)
    else:
        lists = [[(pm.megatron_name, pm.hf_names, pm.transform, "") for pm in mine]]
    entries = []
    for stage, items in enumerate(lists):
        for order, (mname, hf_names, transform, dtype) in enumerate(items):
            key = ParamMap(mname, "", 0, hf_names, transform).sort_key()
            entries.append((key, stage, order, mname, hf_names, transform, dtype))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    by_name = {pm.megatron_name: pm for pm in mine}

    for _, stage, _, mname, hf_names, transform, dtype_str in entries:
        if stage == pp_rank:
            pm = by_name[mname]
            model, param = params[(pm.chunk_index, pm.local_name)]
            shard = param.detach()
            if shard_hook is not None:
                shard = shard_hook(mname, _owner_module(model, pm.local_name), shard).to(param.dtype)
            if transform in EXPERT_TRANSFORMS:
                shards = _gather_tp(shard, etp_group, etp)
            else:
                shards = _gather_tp(shard, tp_group, tp) if TP_DIM[transform] is not None else [shard]
            tensors = [t.contiguous().clone() for t in shards_to_hf(transform, shards, spec)]
            if transform in EXPERT_TRANSFORMS and ep > 1:  # every EP rank's expert at this local index
                per_rank = [_gather_tp(t, ep_group, ep) for t in tensors]  # [n_names][ep]
                tensors = [per_rank[i][e] for e in range(ep) for i in range(len(hf_names))]
        else:
            dtype = getattr(torch, dtype_str.replace("torch.", ""))
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            n_copies = ep if transform in EXPERT_TRANSFORMS else 1
            tensors = [
                torch.empty(hf_shape(n, spec), dtype=dtype, device=device)
                for _ in range(n_copies)
                for n in hf_names
            ]
        if transform in EXPERT_TRANSFORMS and ep > 1:
            # hf_names carry this EP rank's global expert index g; rank e holds g + (e - ep_rank) * n_local.
            g = int(hf_names[0].split(".mlp.experts.")[1].split(".")[0])
            hf_names = tuple(
                n for e in range(ep) for n in expert_hf_names(hf_names, g + (e - ep_rank) * n_local)
            )
        if pp > 1:
            src = dist.get_global_rank(pp_group, stage)
            for t in tensors:
                dist.broadcast(t, src=src, group=pp_group)
        yield from zip(hf_names, tensors)
