"""Does OPSD lift held-out accuracy, and is it the privileged teacher that does it?

    python benchmarks/learning.py                          # seeds 1234 1235, the demo's settings
    python benchmarks/learning.py --seeds 1 2 3 --steps 30 --out runs/learning
    python benchmarks/learning.py --smoke     # seconds: builds every run's command and validates its config

From the shipped warm start (opsd_megatron/demo/assets/warmstart, or --warmstart DIR) on the demo's synthetic
addition task: one held-out evaluation of the warm start (`opsd-eval`, the shared step 0), then per seed two
OPSD runs with examples/synthetic_opsd.yaml (TP=2, vLLM rollouts): the teacher shown the reference solution
(OPSD) and the control with `teacher.privileged=false` (teacher prompt = student prompt). Each run's last
held-out evaluation is compared with step 0 problem by problem (paired 95 % CI).

Prints one table row per run and the mean gains; exits 1 when an OPSD run's gain CI does not exclude zero
or the control's mean gain is not below OPSD's by at least --margin points, 2 on an error.
Takes about 4 minutes per run on a 2-core CPU (run it under the machine's heavy-work lock).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVAL_ARGS = ["--n", "4", "--temperature", "1.0", "--top-p", "0.95", "--max-new-tokens", "48", "--no-thinking",
             "--seed", "0", "--max-model-len", "256", "--dtype", "float32"]  # fmt: skip
"""The held-out evaluation of scripts/demo.sh (and of the config's periodic one)."""


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _train_cmd(a, run: Path, task: dict, seed: int, privileged: str) -> list[str]:
    """The `opsd-train` command of one run (TP=2 under torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "opsd_megatron.train", a.config, f"output_dir={run}", f"model.path={a.warmstart}",
           f"data.path={task['train']}", f"eval.path={task['heldout']}", f"train.seed={seed}",
           f"teacher.privileged={privileged}", "checkpoint.export_hf=false",
           "logging.progress_bar=false"]  # fmt: skip
    return cmd + ([f"train.steps={a.steps}"] if a.steps else [])


def smoke(a, out: Path) -> int:
    """`--smoke`: the task files, and per planned run its command and its validated config (the overrides
    against the config schema); nothing is trained or evaluated. Prints the planned runs' table."""
    from opsd_megatron.config.load import load_config
    from opsd_megatron.demo.warmstart import write_task

    task = write_task(out / "task")
    print("| run | steps | teacher.privileged | command |\n|---|---|---|---|")
    for seed in a.seeds:
        for name, privileged in (("OPSD", "true"), ("control", "false")):
            cmd = _train_cmd(a, out / f"{name}_seed{seed}", task, seed, privileged)
            cfg = load_config(ROOT / a.config, cmd[cmd.index(a.config) + 1 :])
            row = f"| {name} seed {seed} | {cfg.train.steps} | {cfg.teacher.privileged} |"
            print(f"{row} {' '.join(cmd[3:])} |")
    print("PASS (smoke: commands built, configs validated; nothing trained)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    ap.add_argument("--steps", type=int, default=None, help="OPSD steps (default: the config's).")
    ap.add_argument("--warmstart", default=str(ROOT / "opsd_megatron" / "demo" / "assets" / "warmstart"))
    ap.add_argument("--config", default="examples/synthetic_opsd.yaml")
    ap.add_argument("--out", default="runs/learning")
    ap.add_argument("--margin", type=float, default=2.0, help="Points by which OPSD must beat the control.")
    ap.add_argument("--smoke", action="store_true", help="Build the runs' commands and configs; run nothing.")
    a = ap.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONWARNINGS="ignore")  # fmt: skip
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opsd_megatron.demo.warmstart import write_task
    from opsd_megatron.observe.learning import format_learning_table, learning_summary

    out = Path(a.out).resolve()
    if not (Path(a.warmstart) / "model.safetensors").is_file():
        print(f"learning: no warm start in {a.warmstart} (make warmstart)", file=sys.stderr)
        return 2
    if a.smoke:  # into OUT/smoke: an earlier real run's results in OUT stay
        return smoke(a, out / "smoke")
    if out.exists():
        shutil.rmtree(out)
    task = write_task(out / "task")
    before = out / "before"
    py = sys.executable
    _run([py, "-m", "opsd_megatron.eval", "--model", a.warmstart, "--benchmark", str(task["heldout"]),
          *EVAL_ARGS, "--out-dir", str(before)])  # fmt: skip
    summaries: dict[str, dict] = {}
    for seed in a.seeds:
        for name, privileged in (("OPSD", "true"), ("control", "false")):
            run = out / f"{name}_seed{seed}"
            shutil.copytree(before, run / "eval" / "step_000000")
            _run(_train_cmd(a, run, task, seed, privileged))
            summaries[f"{name} seed {seed}"] = learning_summary(run)
    print()
    print(format_learning_table(summaries))
    gains = {n: [s["diff"] for k, s in summaries.items() if k.startswith(n)] for n in ("OPSD", "control")}
    mean = {n: 100 * sum(g) / len(g) for n, g in gains.items()}
    ratio = mean["control"] / mean["OPSD"] if mean["OPSD"] else float("nan")
    print(f"\nmean gain over {len(a.seeds)} seeds: OPSD {mean['OPSD']:+.1f} pts, "
          f"control {mean['control']:+.1f} pts (ratio control/OPSD {ratio:.2f})")  # fmt: skip
    failed = [k for k, s in summaries.items() if k.startswith("OPSD") and s["diff"] - s["half"] <= 0]
    if failed:
        print(f"FAIL: the gain's 95% CI includes zero for {failed}")
        return 1
    if mean["control"] > mean["OPSD"] - a.margin:
        print(f"FAIL: the control gains {mean['control']:+.1f} pts, not {a.margin} pts below OPSD")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"learning: a run failed (exit {e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        sys.exit(2)
