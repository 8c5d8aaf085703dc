"""The shard-exact refresh plan without processes or engines: Megatron shards of random HF tensors (cut by the
conversion transforms, `hf_to_shard`) on simulated TP x PP x EP ranks, the plan (`build_plan`), its
transfers executed in-process into every receiving rank's vLLM-layout targets; each target must equal the
same tensor built independently from the full HF tensors (vLLM's layout: q|k|v and gate|up row blocks per
rank, row-parallel columns, zero-padded vocabulary of a multiple of 64, experts stacked). The real-engine
check (bit-equal to vLLM's own loaders) is tests/test_refresh_shards.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from opsd_megatron.mcore.conversion.mapping import hf_shape, map_name
from opsd_megatron.mcore.conversion.shards import Holding, shard_pieces
from opsd_megatron.mcore.conversion.transforms import hf_to_shard
from opsd_megatron.mcore.models.hf_config import parse_hf_config
from opsd_megatron.rollout.refresh.plan import build_plan
from opsd_megatron.rollout.refresh.slabs import offsets, slab

LAYER = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "input_layernorm.weight",
         "self_attention.q_layernorm.weight", "pre_mlp_layernorm.weight")  # fmt: skip


def _megatron_names(spec, layers: range) -> list[str]:
    names = []
    for i in layers:
        names += [f"decoder.layers.{i}.{s}" for s in LAYER]
        if i in spec.moe_layers:
            names.append(f"decoder.layers.{i}.mlp.router.weight")
            for e in range(spec.num_experts):
                names += [
                    f"decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc{k}.weight" for k in (1, 2)
                ]
        else:
            names += [
                f"decoder.layers.{i}.mlp.linear_fc1.weight",
                f"decoder.layers.{i}.mlp.linear_fc2.weight",
            ]
    return names


def _expected(name: str, full: dict, spec, tp: int, rank: int) -> torch.Tensor:
    """vLLM's rank-`rank` tensor of parameter `name`, built directly from the full HF tensors."""

    def rows(t, n):  # rank's block of rows of n equal blocks
        return t.chunk(n, dim=0)[rank]

    prefix = name.rsplit(".", 2)[0]
    if name.endswith("qkv_proj.weight"):
        q, k, v = (full[f"{prefix}.{p}_proj.weight"] for p in "qkv")
        kv = spec.num_kv_heads
        if kv < tp:  # vLLM replicates kv heads: rank j holds head j // (tp / kv)
            return torch.cat([rows(q, tp), k.chunk(kv)[rank // (tp // kv)], v.chunk(kv)[rank // (tp // kv)]])
        return torch.cat([rows(q, tp), rows(k, tp), rows(v, tp)])
    if name.endswith("gate_up_proj.weight"):
        return torch.cat(
            [rows(full[f"{prefix}.gate_proj.weight"], tp), rows(full[f"{prefix}.up_proj.weight"], tp)]
        )
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return full[name].chunk(tp, dim=1)[rank]
    if name.endswith("w13_weight"):
        pre = name.rsplit(".", 1)[0]
        return torch.stack([torch.cat([rows(full[f"{pre}.{e}.gate_proj.weight"], tp),
                                       rows(full[f"{pre}.{e}.up_proj.weight"], tp)])
                            for e in range(spec.num_experts)])  # fmt: skip
    if name.endswith("w2_weight"):
        pre = name.rsplit(".", 1)[0]
        return torch.stack(
            [full[f"{pre}.{e}.down_proj.weight"].chunk(tp, dim=1)[rank] for e in range(spec.num_experts)]
        )
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        t = full[name]
        padded = torch.zeros(math.ceil(t.shape[0] / 64) * 64, t.shape[1])
        padded[: t.shape[0]] = t
        return rows(padded, tp)
    return full[name]


@pytest.mark.parametrize(
    "arch,tp,pp,ep,etp",
    [("qwen3", 2, 1, 1, 2), ("qwen3", 2, 1, 1, 1), ("qwen3", 1, 2, 1, 2), ("qwen3", 2, 2, 1, 1),
     ("qwen3_moe", 2, 1, 1, 1), ("qwen3_moe", 1, 1, 2, 2), ("qwen3_moe", 2, 1, 2, 4)],
)  # fmt: skip
def test_plan_fills_every_engine_rank_with_exactly_its_shard(tiny_models, arch, tp, pp, ep, etp):
    spec, _ = parse_hf_config(tiny_models(arch))
    gen = torch.Generator().manual_seed(0)
    world = tp * pp * ep
    layers_per_stage = spec.num_layers // pp
    holdings, shards = {}, {}
    full: dict[str, torch.Tensor] = {}
    for rank in range(world):  # Megatron order: TP fastest, then EP (inside DP), then PP
        t_rank, e_rank, stage = rank % tp, (rank // tp) % ep, rank // (tp * ep)
        names = _megatron_names(spec, range(stage * layers_per_stage, (stage + 1) * layers_per_stage))
        names += ["embedding.word_embeddings.weight"] if stage == 0 else []
        names += ["decoder.final_layernorm.weight", "output_layer.weight"] if stage == pp - 1 else []
        holdings[rank], shards[rank] = [], {}
        for m in names:
            hf_names, transform, export = map_name(m, spec)
            expert = int(m.split("local_experts.")[1].split(".")[0]) if "local_experts" in m else None
            if not export or (expert is not None and expert // (spec.num_experts // ep) != e_rank):
                continue
            for n in hf_names:
                full.setdefault(n, torch.randn(hf_shape(n, spec), generator=gen))
            size = 1 if transform == "replicated" else tp
            rk = 0 if transform == "replicated" else t_rank
            padded = math.ceil(spec.vocab_size / (128 * tp)) * 128 * tp

            def read(name, dim, start, stop):
                return full[name] if dim is None else full[name].narrow(dim, start, stop - start)

            shard = hf_to_shard(transform, read, hf_names, spec, rk, size, padded).contiguous()
            pieces = shard_pieces(transform, hf_names, spec, rk, size, shard.shape[0])
            holdings[rank].append(Holding(m, tuple(pieces), "torch.float32"))
            shards[rank][m] = shard.view(-1)
    engines = {r: (etp, r % etp) for r in range(world)}
    plan = build_plan(holdings, engines, {r: 0 for r in range(world)}, spec, 20_000, 4)
    filled: dict[int, dict[str, torch.Tensor]] = {r: {} for r in range(world)}
    for bucket in plan.buckets:
        remote = False
        for r, targets in bucket.targets.items():
            for t in targets:
                filled[r][t.name] = torch.full(t.shape, float("nan"))
                flat, offs = filled[r][t.name].view(-1), offsets(t.pieces)
                for i, p in enumerate(t.pieces):
                    if p.hf_name is None:
                        flat[offs[i] : offs[i] + p.numel] = 0
        tmap = {(r, t.name): t for r, ts in bucket.targets.items() for t in ts}
        for tr in bucket.transfers:
            h = plan.holdings[tr.src][tr.key]
            src = slab(
                shards[tr.src][tr.key], h.pieces, offsets(h.pieces), tr.src_piece, tr.dim, tr.lo, tr.hi
            )
            t = tmap[(tr.dst, tr.target)]
            flat = filled[tr.dst][tr.target].view(-1)
            slab(flat, t.pieces, offsets(t.pieces), tr.dst_piece, tr.dim, tr.lo, tr.hi).copy_(src)
            remote = remote or tr.src != tr.dst
        assert bucket.remote == remote
    for r in range(world):
        for name, got in filled[r].items():
            torch.testing.assert_close(got, _expected(name, full, spec, etp, r % etp), rtol=0, atol=0)
        # every vLLM parameter of the rank is there (norms, router, head, fused layers)
        assert any(n.endswith("qkv_proj.weight") for n in filled[r])
    if tp == etp and pp == 1 and ep == 1:
        assert not any(b.remote for b in plan.buckets)  # equal layouts: nothing crosses ranks
