"""Megatron → vLLM refresh, end to end, in the colocated layout: two gloo ranks, each with its own in-process
vLLM engine, one Megatron model trained for three optimizer steps at TP2×PP1 and then at TP1×PP2.

After every step: `WeightSyncer.sync` (shard-exact: each rank's engine receives the slabs it lacks) on both
ranks; vLLM greedy output == transformers greedy output on the exported weights; the drift between vLLM's
sampled-token logprobs and the Megatron model's own (vocab-parallel) logprobs is < 1e-4 in fp32. Then a
deliberately wrong tensor makes the drift large and the guard fire. Gloo collectives keep working around
every engine call.
One spawned run (engine start-up dominates); the checks read its per-rank results.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

PROMPTS = [[5, 6, 7, 8, 9], [40, 41], [100, 200, 300, 400, 500, 600, 7]]
LAYOUTS = [(2, 1), (1, 2)]
STEPS = 3
CHECKED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight")


def _train_step(chunks, opt, x, labels):
    """Megatron schedule forward/backward on a next-token loss, tied-embedding/qk-norm grad sync, Adam."""
    from megatron_utils import lm_forward_backward

    opt.zero_grad(set_to_none=True)
    lm_forward_backward(chunks, x, labels)
    opt.step()


def _trainer_logprobs(chunks, prompt, response, sampling):
    """Megatron's own logprobs of `response` (vocab-parallel helper on the last stage; None elsewhere)."""
    from megatron.core import parallel_state as mps

    from opsd_megatron.losses.token_logprobs import vocab_parallel_token_logprobs
    from opsd_megatron.mcore.models.builder import model_info
    from opsd_megatron.mcore.models.forward import forward_logits

    ids = torch.tensor([list(prompt) + list(response)])
    logits = forward_logits(chunks, ids, gather_vocab=False)  # last stage: [1, s, v_pad/tp]
    if logits is None:
        return None
    if logits.shape[0] != 1:  # Megatron returns [b, s, v] here; guard against [s, b, v]
        logits = logits.transpose(0, 1)
    resp = logits[:, len(prompt) - 1 : -1]  # [1, r, v/tp] predicting the response
    return vocab_parallel_token_logprobs(
        resp,
        torch.tensor([list(response)]),
        sampling,
        vocab_size=model_info(chunks).vocab_size,
        tp_group=mps.get_tensor_model_parallel_group(),
    )[0]


def _drift_round(chunks, engine, sampling):
    """Rank 0's rollouts (broadcast) scored by Megatron; metrics broadcast from the last stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    from opsd_megatron.rollout.refresh import compute_drift

    outs = engine.generate(PROMPTS, sampling)
    box = [[(s.token_ids, s.logprobs) for s in o] for o in outs]
    ranks_out = [None] * dist.get_world_size()
    dist.all_gather_object(ranks_out, box)
    box = ranks_out[0]
    eng, mine = [], []
    for prompt, samples in zip(PROMPTS, box):
        for ids, lps in samples:
            lp = _trainer_logprobs(chunks, prompt, ids, sampling)
            if lp is not None:
                eng.append(torch.tensor(lps))
                mine.append(lp)
    metrics = None
    if mps.is_pipeline_last_stage():
        metrics = compute_drift(torch.cat(eng)[None], torch.cat(mine)[None])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)
    same_samples = all(r == ranks_out[0] for r in ranks_out)
    return next(m for m in gathered if m is not None), same_samples


def _tp_logprobs(rank):
    """vocab_parallel_token_logprobs on a TP=2 vocabulary split (test_refresh.logprob_case)."""
    from megatron.core import parallel_state as mps
    from test_refresh import SAMPLINGS, logprob_case

    from opsd_megatron.losses.token_logprobs import vocab_parallel_token_logprobs

    logits, ids, vocab, _ = logprob_case()
    part = logits.shape[-1] // 2
    shard = logits[..., rank * part : (rank + 1) * part].clone()
    out = []
    for s in SAMPLINGS:
        before = shard.clone()
        group = mps.get_tensor_model_parallel_group()
        out.append(vocab_parallel_token_logprobs(shard, ids, s, vocab_size=vocab, tp_group=group))
        assert torch.equal(before, shard)  # input untouched
    return out


def _colocated_bundle(rank, world, model_dir):
    import time

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import export_hf_weights, load_hf_weights
    from opsd_megatron.mcore.models.builder import build_model
    from opsd_megatron.rollout import SamplingConfig, make_engine
    from opsd_megatron.rollout.refresh import DriftError, DriftGuard, WeightSyncer

    res: dict = {"steps": []}
    parallel.initialize(tp=2, pp=1, seed=1234)  # the trainer's world exists before the engines
    res["tp2_logprobs"] = _tp_logprobs(rank)
    t0 = time.perf_counter()
    engine = make_engine("vllm", model_dir, dtype="float32", seed=0, max_model_len=128)
    res["startup_s"] = time.perf_counter() - t0
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    sampled = SamplingConfig(temperature=1.1, top_p=0.95, top_k=20, seed=5, max_new_tokens=12)

    # colocated engines: different work per rank, collectives in between
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    res["own_prompts"] = [o[0].token_ids for o in engine.generate(PROMPTS[rank:], greedy)]
    y = torch.tensor([float(rank + 1)])
    dist.all_reduce(y)
    res["allreduce"] = (x.item(), y.item())

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    for tp, pp in LAYOUTS:
        parallel.initialize(tp=tp, pp=pp, seed=1234)
        chunks = build_model(model_dir, torch.float32)
        load_hf_weights(chunks, model_dir)
        opt = torch.optim.Adam([p for c in chunks for p in c.parameters()], lr=3e-2)
        # shard-exact refresh (each rank's TP-1 engine gets the other rank's TP half / PP stage's layers)
        syncer = WeightSyncer(engine, bucket_bytes=150_000)
        for step in range(STEPS):
            ids = torch.randint(0, 731, (2, 16), generator=gen)
            _train_step(chunks, opt, ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
            stats = syncer.sync(chunks)
            exported = {name: t.clone() for name, t in export_hf_weights(chunks)}  # the reference weights
            hf.load_state_dict(exported, strict=False)
            with torch.no_grad():
                ref = []
                for p in PROMPTS:
                    out = hf.generate(
                        torch.tensor([p]), do_sample=False, max_new_tokens=12, top_k=None, top_p=None
                    )
                    ref.append(out[0, len(p) :].tolist())
            got = [o[0].token_ids for o in engine.generate(PROMPTS, greedy)]
            drift_g, _ = _drift_round(chunks, engine, greedy)
            drift_s, same = _drift_round(chunks, engine, sampled)
            z = torch.ones(1)
            dist.all_reduce(z)
            res["steps"].append(
                dict(
                    layout=(tp, pp),
                    step=step,
                    greedy_equal=got == ref,
                    drift_greedy=drift_g,
                    drift_sampled=drift_s,
                    same_samples_on_ranks=same,
                    buckets=stats.buckets,
                    shard_exact=syncer.shard_exact,
                    collectives=stats.collectives,
                    bytes=stats.bytes,
                    refresh_s=stats.seconds,
                    allreduce=z.item(),
                    checksum=[float(exported[k].double().abs().sum()) for k in CHECKED],
                )
            )
        # a deliberately wrong tensor (layer 1's down-projection in layer 2's place)
        engine.update_weights(
            [("model.layers.2.mlp.down_proj.weight", exported["model.layers.1.mlp.down_proj.weight"])]
        )
        bad, _ = _drift_round(chunks, engine, greedy)
        res.setdefault("wrong", []).append(bad)
        try:
            DriftGuard(1e-3).check(bad, step=STEPS)
            res.setdefault("guard", []).append("not raised")
        except DriftError as e:
            res.setdefault("guard", []).append(str(e))
    engine.close()  # must leave the trainer's world usable
    w = torch.ones(1)
    dist.all_reduce(w)
    res["after_close_allreduce"] = w.item()
    return res


@pytest.fixture(scope="module")
def colocated(tiny_qwen3_dir):
    pytest.importorskip("vllm")
    return run_distributed(_colocated_bundle, 2, tiny_qwen3_dir, timeout=900)


@pytest.mark.vllm
def test_two_colocated_engines_in_one_gloo_world(colocated):
    for rank, res in enumerate(colocated):
        assert res["allreduce"] == (3.0, 3.0)
        assert len(res["own_prompts"]) == len(PROMPTS) - rank
        assert res["after_close_allreduce"] == 2.0
    # rank 1 generated PROMPTS[1:], rank 0 all of them: same model, same greedy answers
    assert colocated[1]["own_prompts"] == colocated[0]["own_prompts"][1:]


@pytest.mark.vllm
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"tp{t[0]}pp{t[1]}")
def test_refresh_after_each_step_matches_transformers_and_megatron(colocated, layout):
    for res in colocated:
        steps = [s for s in res["steps"] if s["layout"] == layout]
        assert len(steps) == STEPS
        for s in steps:
            assert s["greedy_equal"], s
            assert s["same_samples_on_ranks"], s
            for key in ("drift_greedy", "drift_sampled"):
                assert s[key]["drift/mean_abs_logprob"] < 1e-4, s
                assert s[key]["drift/mult_prob_err"] < 1e-4, s
            assert s["buckets"] >= 4 and s["bytes"] > 0 and s["allreduce"] == 2.0
            assert s["shard_exact"] and 0 < s["collectives"] <= s["buckets"], s  # one all-to-all per bucket
        # every step changed the embedding, a fused attention weight and a norm (the refresh had work to do)
        for a, b in zip(steps, steps[1:]):
            assert all(x != y for x, y in zip(a["checksum"], b["checksum"]))


def test_vocab_parallel_token_logprobs_tp2(colocated):
    from test_refresh import logprob_case

    refs = logprob_case()[3]
    for res in colocated:
        for got, ref in zip(res["tp2_logprobs"], refs):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.vllm
def test_wrong_tensor_is_caught(colocated):
    for res in colocated:
        for bad, msg in zip(res["wrong"], res["guard"]):
            assert bad["drift/mean_abs_logprob"] > 1e-2, bad
            assert "out of sync" in msg
