"""Does OPSD lift test accuracy over seeds, and is it the reference solution that does it?

    python benchmarks/learning.py                                   # 3 seeds x (OPSD, shuffled, blank)
    python benchmarks/learning.py --seeds 1 2 3 --runs OPSD shuffled --out runs/learning
    python benchmarks/learning.py --smoke                           # the decision and checks only (seconds)
    python benchmarks/learning.py --runs shuffled --reuse runs/learning --out runs/learning_ctl  # alongside
    python benchmarks/learning.py --report runs/learning runs/learning_ctl                       # their table
    python benchmarks/learning.py --staleness1 --seeds 1234 --runs OPSD --out runs/learning_async  # issue 23

From the shipped warm start (opsd_megatron/demo/assets/warmstart, or --warmstart DIR) on the demo's synthetic
addition task (train / dev / test splits, `opsd_megatron.demo.synthetic`): one evaluation of the warm start on
the TEST split (`opsd-eval`, the shared step 0; plus, once, `opsd-eval --privileged`: the same network shown
the reference solution), then per seed one run of examples/synthetic_opsd.yaml (TP=2, vLLM rollouts) per
`teacher.privileged` mode: OPSD (true: the problem's own reference solution), the `shuffled` control (the
teacher's template with ANOTHER training problem's solution) and the `blank` control (an empty solution). The
runs skip the periodic dev evaluation (dev is for choosing settings; nothing here chooses). Each run's HF
export is evaluated on the test split and compared with step 0 problem by problem (`observe.learning`, which
first asserts the before row is step 0, the problem sets are identical and the evaluation fingerprints are
identical).

`--staleness1` runs the same recipe with the engine on a rank of its own, one step off-policy
(`STALENESS1`: 1 trainer rank at TP 1 + 1 engine rank, rollout.placement=separate, max_staleness=1); with one
seed the decision is the paired CI over problems of that seed (no spread over seeds to show), and the
table adds the runs' steps/s.

Prints per run the paired gain with its 95 % CI (over problems), and per mode the mean gain over seeds with a
95 % CI over seeds (Student t: seed-to-seed spread, not only evaluation noise). Exits 1 when OPSD's mean-gain
CI includes 0 or the shuffled control's mean gain is not below OPSD's, 2 on an error (a failed run,
evaluations that are not comparable). Takes about 4-6 minutes per run on a quiet 2-core CPU (9 runs: about an
hour). `--smoke` checks the decision and the comparability checks on made-up evaluation directories (seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opsd_megatron.demo.warmstart import SHIPPED, write_task  # noqa: E402
from opsd_megatron.observe.learning import LearningCheckError, learning_summary  # noqa: E402
from opsd_megatron.observe.metrics import read_metrics  # noqa: E402

EVAL_ARGS = ["--n", "4", "--temperature", "1.0", "--top-p", "0.95", "--max-new-tokens", "48", "--no-thinking",
             "--seed", "0", "--max-model-len", "256", "--dtype", "float32"]  # fmt: skip
"""The test evaluation of scripts/demo.sh (and of the config's periodic dev one)."""
MODES = {"OPSD": "true", "shuffled": "shuffled", "blank": "blank"}
"""Run name -> teacher.privileged."""
STALENESS1 = ["parallel.tp=1", "rollout.placement=separate", "rollout.engine_replicas=1",
              "rollout.max_staleness=1"]  # fmt: skip
"""--staleness1: the demo recipe on two processes, one trainer rank and one engine rank (issue 23)."""
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95 % Student-t quantiles by degrees of freedom (1.96 beyond)."""


def seed_ci(values: list[float]) -> tuple[float, float]:
    """(mean, 95 % half-width over seeds, Student t; nan with one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def decide(gains: dict[str, list[float]], one_seed_half: float | None = None) -> list[str]:
    """Why the benchmark fails (empty: it passes). `gains`: mode -> per-seed gains (fractions).
    `one_seed_half`: OPSD ran one seed; its gain's 95 % half-width over problems is the CI used."""
    why = []
    m, h = seed_ci(gains["OPSD"])
    what = "95% CI over seeds"
    if one_seed_half is not None and len(gains["OPSD"]) == 1:
        h, what = one_seed_half, "one seed: 95% CI over problems"
    if not m - h > 0:  # nan (several modes, one seed) fails too: no spread, no claim
        why.append(f"OPSD's mean gain {100 * m:+.1f} ± {100 * h:.1f} pts ({what}) includes 0")
    if "shuffled" in gains:
        s = sum(gains["shuffled"]) / len(gains["shuffled"])
        if not s < m:
            why.append(
                f"the shuffled control's mean gain {100 * s:+.1f} pts is not below OPSD's {100 * m:+.1f}"
            )
    return why


def format_table(summaries: dict[tuple[str, int], dict]) -> str:
    """Per run: test accuracy before/after and the paired gain; per mode: the mean gain over seeds."""
    lines = [
        "| run | seed | test before (%) | after (%) | gain (pts, 95% CI over problems) |",
        "|---|---|---|---|---|",
    ]
    for (name, seed), s in summaries.items():
        speed = (
            f" ({s['steps_per_s']:.2f} steps/s, run {s['run_wall_s'] / 60:.1f} min)"
            if "steps_per_s" in s
            else ""
        )
        lines.append(f"| {name}{speed} | {seed} | {100 * s['before']:.1f} | {100 * s['after']:.1f} "
                     f"| {100 * s['diff']:+.1f} ± {100 * s['half']:.1f} |")  # fmt: skip
    lines += ["", "| mode | seeds | mean gain (pts, 95% CI over seeds) |", "|---|---|---|"]
    for name in dict.fromkeys(n for n, _ in summaries):
        g = [s["diff"] for (n, _), s in summaries.items() if n == name]
        m, h = seed_ci(g)
        lines.append(f"| {name} | {len(g)} | {100 * m:+.1f} ± {100 * h:.1f} |")
    n = next(iter(summaries.values()))["num_problems"]
    lines.append(f"\n{int(n)} test problems (never used to choose settings), Avg@4; step 0 = the warm start.")
    return "\n".join(lines)


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _eval(model: str | Path, bench: Path, out: Path, *extra: str) -> None:
    _run([sys.executable, "-m", "opsd_megatron.eval", "--model", str(model), "--benchmark", str(bench),
          *EVAL_ARGS, *extra, "--out-dir", str(out)])  # fmt: skip


def run_one(a: argparse.Namespace, out: Path, task: dict, name: str, seed: int, before: Path) -> dict:
    """One OPSD run (mode `name`, seed), its test evaluation, its summary against `before` (step 0), with
    the run's wall time and steps/s (metrics.jsonl's time/step_s)."""
    run = out / f"{name}_seed{seed}"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "opsd_megatron.train", a.config, f"output_dir={run}", f"model.path={a.warmstart}",
           f"data.path={task['train']}", f"eval.path={task['dev']}", "eval.interval=0",
           f"train.seed={seed}", f"teacher.privileged={MODES[name]}", "checkpoint.export_hf=true",
           "logging.progress_bar=false", *(STALENESS1 if a.staleness1 else []), *a.overrides]  # fmt: skip
    _run(cmd)
    wall, rows = time.monotonic() - t0, read_metrics(run)
    step = rows[-1]["step"]
    shutil.copytree(before, run / "test" / "step_000000")
    _eval(run / "hf", task["test"], run / "test" / f"step_{step:06d}")
    steps_s = len(rows) / sum(r.get("time/step_s", 0.0) for r in rows)
    return {**learning_summary(run, evals="test"), "run_wall_s": wall, "steps_per_s": steps_s}


def smoke() -> int:
    """The decision and the comparability checks on made-up evaluations; 0 when they behave."""
    tmp = Path(tempfile.mkdtemp(prefix="learning-smoke-"))
    try:
        fp = {"model": "m", "n": 2, "sampling": {"temperature": 1.0, "seed": 0}, "template": "t",
              "thinking": False, "chat": True}  # fmt: skip
        other = {"sampling": {"temperature": 0.5, "seed": 0}}
        cases = (
            (0, [0, 0] * 20 + [1, 0] * 20, {}),
            (5, [1, 0] * 20 + [1, 1] * 20, {}),
            (6, [1, 1] * 40, other),
        )
        for step, hits, over in cases:
            d = tmp / "run" / "test" / f"step_{step:06d}"
            d.mkdir(parents=True)
            recs = [{"benchmark": "b", "key": str(i // 2), "sample": i % 2, "correct": bool(c)}
                    for i, c in enumerate(hits)]  # fmt: skip
            (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            (d / "run_config.json").write_text(json.dumps({**fp, **over}))
        (tmp / "run" / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 0.1}) + "\n")
        try:
            learning_summary(tmp / "run", evals="test")
            print("smoke: FAIL: different sampling settings were not refused")
            return 1
        except LearningCheckError as e:
            print(f"smoke: refused as it should: {e}")
        shutil.rmtree(tmp / "run" / "test" / "step_000006")
        s = learning_summary(tmp / "run", evals="test")
        table = format_table({("OPSD", 1): s, ("shuffled", 1): {**s, "diff": 0.0}})
        print(table)
        ok = (not decide({"OPSD": [0.10, 0.12, 0.11], "shuffled": [0.02, 0.0, 0.01]})
              and decide({"OPSD": [0.10, -0.05, 0.02], "shuffled": [0.0, 0.0, 0.0]})
              and decide({"OPSD": [0.10, 0.12, 0.11], "shuffled": [0.12, 0.11, 0.13]})
              and decide({"OPSD": [0.1]}) and not decide({"OPSD": [0.1]}, 0.05)
              and decide({"OPSD": [0.1]}, 0.15) and abs(s["diff"] - 0.5) < 1e-12)  # fmt: skip
        print("smoke: PASS" if ok else "smoke: FAIL: the decision is wrong")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(dirs: list[Path], t0: float | None = None) -> int:
    """Print the table, the warm start's lines and the decision from the finished runs recorded in each
    DIR/summaries.json (one benchmark, or several run side by side with --reuse); 1 on a failed decision."""
    summaries: dict[tuple[str, int], dict] = {}
    for d in dirs:
        for key, v in json.loads((d / "summaries.json").read_text()).items():
            name, seed = key.rsplit(" ", 1)
            summaries[(name, int(seed))] = v
    summaries = dict(sorted(summaries.items(), key=lambda kv: (list(MODES).index(kv[0][0]), kv[0][1])))
    print()
    print(format_table(summaries))
    print(f"\nthe warm start on the test split: {_avg(dirs[0] / 'before')}; shown the reference solution "
          f"(opsd-eval --privileged): {_avg(dirs[0] / 'privileged')}")  # fmt: skip
    if t0 is not None:
        print(f"took {(time.monotonic() - t0) / 60:.1f} min")
    modes = list(dict.fromkeys(n for n, _ in summaries))
    if "OPSD" not in modes:
        print("no decision: OPSD has no finished run here (combine directories with --report)")
        return 0
    one = [s["half"] for (m, _), s in summaries.items() if m == "OPSD"]
    gains = {n: [s["diff"] for (m, _), s in summaries.items() if m == n] for n in modes}
    why = decide(gains, one[0] if len(one) == 1 and modes == ["OPSD"] else None)
    for w in why:
        print(f"FAIL: {w}")
    print("PASS" if not why else "")
    return 1 if why else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    ap.add_argument("--runs", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--warmstart", default=str(SHIPPED))
    ap.add_argument("--config", default="examples/synthetic_opsd.yaml")
    ap.add_argument("--out", default="runs/learning")
    ap.add_argument("--smoke", action="store_true", help="Only the decision and the checks (seconds).")
    ap.add_argument(
        "--staleness1", action="store_true", help="Separate placement, one step off-policy (STALENESS1)."
    )
    ap.add_argument(
        "--reuse", metavar="DIR", help="Take the task and the step-0 evaluations from an earlier --out."
    )
    ap.add_argument(
        "--report", metavar="DIR", nargs="+", help="Only print the table and decision of finished runs."
    )
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of every run's config")
    a = ap.parse_intermixed_args(argv)
    if a.smoke:
        return smoke()
    if a.report:
        return report([Path(d).resolve() for d in a.report])
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONWARNINGS="ignore")  # fmt: skip
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not (Path(a.warmstart) / "model.safetensors").is_file():
        print(f"learning: no warm start in {a.warmstart} (make warmstart)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    out = Path(a.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    if a.reuse:
        for sub in ("task", "before", "privileged"):
            shutil.copytree(Path(a.reuse) / sub, out / sub)
        task = {k: out / "task" / f"{k}.jsonl" for k in ("train", "dev", "test")}
    else:
        task = write_task(out / "task")
        _eval(a.warmstart, task["test"], out / "before")
        _eval(a.warmstart, task["test"], out / "privileged", "--privileged", *_teacher_format(a.config))
    summaries: dict[tuple[str, int], dict] = {}
    for name in a.runs:  # mode by mode: a cut-short benchmark still has OPSD and shuffled over all seeds
        for seed in a.seeds:
            summaries[(name, seed)] = run_one(a, out, task, name, seed, out / "before")
            (out / "summaries.json").write_text(
                json.dumps({f"{n} {s}": v for (n, s), v in summaries.items()})
            )
    return report([out], t0)


def _teacher_format(config: str) -> list[str]:
    """opsd-eval flags for the teacher's format of `config`: its prompts.teacher_template and thinking switch
    (prompts.teacher_thinking, default on: the warm start learnt the teacher format that way)."""
    path = Path(config) if Path(config).is_file() else ROOT / config
    prompts = yaml.safe_load(path.read_text()).get("prompts") or {}
    return ["--template", prompts["teacher_template"],
            "--thinking" if prompts.get("teacher_thinking", True) else "--no-thinking"]  # fmt: skip


def _avg(eval_dir: Path) -> str:
    """The Avg@n line of an opsd-eval summary."""
    overall = json.loads((eval_dir / "summary.json").read_text())["overall"]
    return ", ".join(f"{k} {100 * v:.1f} %" for k, v in overall.items() if k.lower().startswith("avg"))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"learning: a run failed (exit {e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        sys.exit(2)
    except LearningCheckError as e:
        print(f"learning: {e}", file=sys.stderr)
        sys.exit(2)
