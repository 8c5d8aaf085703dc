"""Evaluation wall time on every engine vs on one engine: the same problems, seeds and run.

    .venv/bin/python benchmarks/bench_eval.py                        # world 2: two TP-1 engines vs one (goal)
    .venv/bin/python benchmarks/bench_eval.py --world 4 --engine-tp 2  # two TP-2 engines vs one (issue 22)
    .venv/bin/python benchmarks/bench_eval.py --smoke                # seconds: checks the script

Spawns a gloo world of `--world` ranks; every rank starts its part of a vLLM engine of TP `--engine-tp`
(world / TP engines; a random Qwen3 of `--layers` x `--hidden`, fp32, at most `--max-num-seqs` sequences
in flight per engine: vLLM's `max_num_seqs`, standing for the KV cache that bounds an engine's batch: the
paper's 30 x 12 samples x up to 38,912 tokens do not fit one engine's at once, so one engine decodes them in
waves and E engines in 1/E of the waves). Rank 0 then evaluates the same
synthetic benchmark (`--problems` "a + b" problems, `--n` samples each, `--max-new-tokens`, temperature 1,
seeded) through `rollout.engine_group.spreading` over all engines and over engine 0 alone (the others idle),
alternating, `--repeats` times each after one warm-up round; the time is the whole
`evaluation.runner.evaluate` call (render, generate, grade, write). It prints each run's requests per
engine and wall time and the ratio (min over repeats) all engines / one engine, and checks that both gave
the same metrics (per-sample seeds: exit 1 otherwise). Goal (`thresholds.LIMITS["eval_engines_x_one"]`,
0.6 at two engines): exit 1 when missed, except with `--smoke` (tiny shapes, seconds: the ratio is noise).

The CPU seconds of each rank (`time.process_time`, the in-process engine included) are printed too: the
busiest rank's is the wall time the run would take with one free core per rank, which an oversubscribed,
shared machine cannot show in wall time. Each engine stands for one device (`--pin`, `_cores`): with a
core per rank, rank r runs on core r; with fewer cores than ranks, engine e's TP ranks share core e mod
cores (`--world 4 --engine-tp 2` on 2 cores: each TP-2 engine on a core of its own, the one-engine run
leaves the other engine's core idle, as a cluster leaves the other engines' GPUs idle). The CPU seconds of the
ranks that only wait in a one-engine run are printed as a share of the busy rank's: a waiting rank that
spun (a busy-polling collective or engine loop) would steal its core's time from a neighbour.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from thresholds import check  # noqa: E402  (the benchmarks' shared thresholds, next to this file)


def _cores(rank: int, world: int, engine_tp: int) -> set[int]:
    """The core rank `rank` is pinned to: its own with a core per rank, else its engine's (an engine = a
    device: its TP ranks share one core, engines never share one while cores last)."""
    cores = os.cpu_count() or 1
    return {rank % cores} if cores >= world else {(rank // engine_tp) % cores}


PRELOAD = ["torch", "transformers", "vllm", "opsd_megatron.evaluation.runner", "opsd_megatron.rollout"]
"""What the ranks' fork server imports once (an import that fails there is left to the rank)."""


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), VLLM_ENABLE_V1_MULTIPROCESSING="0")  # fmt: skip
    if cfg["pin"] and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, _cores(rank, world, cfg["engine_tp"]))
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from opsd_megatron.evaluation.grader import GraderPool
    from opsd_megatron.evaluation.runner import evaluate
    from opsd_megatron.mcore import parallel
    from opsd_megatron.rollout import make_engine
    from opsd_megatron.rollout.base import SamplingConfig
    from opsd_megatron.rollout.engine_group import serve, spreading
    from opsd_megatron.rollout.placement import EnginePlacement

    group = parallel.init_world(timeout_minutes=60)
    pl = EnginePlacement(world, rank, cfg["engine_tp"])
    engine = make_engine("vllm", cfg["model"], dtype="float32", seed=0, max_model_len=512,
                         tensor_parallel_size=cfg["engine_tp"], gpu_memory_utilization=0.05,
                         max_num_seqs=cfg["max_num_seqs"])  # fmt: skip
    pair = (("one", 1), ("all", pl.num_engines))
    plan = [("warm-up", pl.num_engines)] + [run for _ in range(cfg["repeats"]) for run in pair]
    if rank != 0:
        cpu = []
        for _ in plan:
            c0 = time.process_time()
            serve(engine, pl, group)
            cpu.append(time.process_time() - c0)
        engine.close()
        (Path(out_dir) / f"cpu{rank}.json").write_text(json.dumps(cpu))
        return
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=cfg["max_new_tokens"], seed=1)
    rows = []
    with GraderPool(num_workers=1) as pool:
        for i, (name, num) in enumerate(plan):
            with spreading(engine, pl, group, num_engines=num) as spread:
                t0, c0 = time.perf_counter(), time.process_time()
                s = evaluate(spread, tok, [cfg["bench"]], cfg["n"], sampling, Path(out_dir) / f"run{i}",
                             chunk_size=cfg["chunk"], grader=pool)  # fmt: skip
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            tokens = s["overall"].get("mean_response_tokens")
            rows.append(dict(name=name, engines=num, requests=spread.requests, seconds=seconds, cpu=[cpu],
                             metrics=s["benchmarks"], tokens=tokens))  # fmt: skip
    engine.close()
    (Path(out_dir) / "rows.json").write_text(json.dumps(rows))


def _pin_note(args: argparse.Namespace) -> str:
    if (os.cpu_count() or 1) >= args.world:
        return " (pinned: a core per rank)"
    return f" (pinned: a core per engine, its {args.engine_tp} TP ranks share it)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--engine-tp", type=int, default=1)
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64, help="problems per generate call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=16, help="sequences in flight per engine (KV bound)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; no threshold")
    args = ap.parse_args()
    if args.smoke:
        args.problems, args.n, args.max_new_tokens, args.layers, args.hidden, args.repeats = (
            4,
            2,
            8,
            1,
            128,
            1,
        )
    import torch.multiprocessing as mp

    from opsd_megatron.demo.tiny import make_tiny_hf_model

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        h = args.hidden
        shape = dict(num_hidden_layers=args.layers, hidden_size=h, intermediate_size=3 * h, head_dim=64,
                     num_attention_heads=h // 64, num_key_value_heads=max(1, h // 128))  # fmt: skip
        model = make_tiny_hf_model(Path(tmp) / "model", "qwen3", **shape)
        bench = Path(tmp) / "sums.jsonl"
        rows = [
            {"problem": f"What is {a} + {2 * a + 1}?", "answer": str(3 * a + 1)} for a in range(args.problems)
        ]
        bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = dict(model=str(model), bench=str(bench), engine_tp=args.engine_tp, n=args.n, chunk=args.chunk,
                   max_new_tokens=args.max_new_tokens, repeats=args.repeats, pin=args.pin,
                   max_num_seqs=args.max_num_seqs)  # fmt: skip
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        os.environ.update({k: os.environ.get(k, v) for k, v in env.items()})
        # the ranks fork from one server that imported torch, vLLM and the package once (start-up is not
        # measured): ~16 CPU-s of imports per rank on the 2-core CPU machine, paid once, not `world` times
        mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
        mp.start_processes(
            _worker, args=(args.world, port, cfg, tmp), nprocs=args.world, start_method="forkserver"
        )
        rows = json.loads((Path(tmp) / "rows.json").read_text())
        for r in range(1, args.world):  # the other ranks' CPU seconds per run
            for row, c in zip(rows, json.loads((Path(tmp) / f"cpu{r}.json").read_text())):
                row["cpu"].append(c)
    engines = args.world // args.engine_tp
    print(f"\nevaluation, world {args.world}, {engines} engine(s) of TP {args.engine_tp}, {args.problems} "
          f"problems x {args.n} samples, <= {args.max_new_tokens} new tokens, <= {args.max_num_seqs} "
          f"sequences in flight per engine, {os.cpu_count()} CPU cores"
          f"{_pin_note(args) if args.pin else ''}")  # fmt: skip
    print(f"{'run':>8} {'engines':>8} {'requests per engine':>22} {'mean tokens':>12} {'wall s':>8} "
          f"{'CPU s per rank':>22} {'max CPU s':>10}")  # fmt: skip
    for r in rows:
        cpu = str([round(c, 1) for c in r["cpu"]])
        print(f"{r['name']:>8} {r['engines']:>8} {str(r['requests']):>22} {r['tokens'] or 0:>12.1f} "
              f"{r['seconds']:>8.2f} {cpu:>22} {max(r['cpu']):>10.2f}")  # fmt: skip
    one = min(r["seconds"] for r in rows if r["name"] == "one")
    every = min(r["seconds"] for r in rows if r["name"] == "all")
    failures: list[str] = []
    same = all(r["metrics"] == rows[0]["metrics"] for r in rows)
    if not same:
        failures.append("the metrics differ between runs (per-request seeds must make them equal)")
    ratio = every / one
    verdict = "not checked (--smoke)" if args.smoke else check("eval_engines_x_one", ratio, failures)
    print(
        f"all engines / one engine: {every:.2f} s / {one:.2f} s = {ratio:.2f}x  {verdict}; "
        f"same metrics: {same}"
    )
    cpu_ratio = min(max(r["cpu"]) for r in rows if r["name"] == "all") / min(
        max(r["cpu"]) for r in rows if r["name"] == "one"
    )
    print(
        f"critical path in CPU seconds (the busiest rank; = wall time with one free core per rank): "
        f"{cpu_ratio:.2f}x (not checked: wall time is the goal)"
    )
    idle = [
        c / max(r["cpu"][0], 1e-9) for r in rows if r["name"] == "one" for c in r["cpu"][args.engine_tp :]
    ]
    if idle:
        print(f"ranks waiting in one-engine runs: CPU s = {100 * max(idle):.1f} % of the busy rank's at most "
              f"({'no spinning' if max(idle) < 0.1 else 'they spin: their core is not free'})")  # fmt: skip
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
