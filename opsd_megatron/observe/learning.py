"""Did the run learn? Held-out accuracy before/after (paired 95 % CI) plus the run's training signals.

    s = learning_summary("runs/demo/opsd")        # needs RUN/eval/step_000000 and a later evaluation
    print(format_learning_table({"OPSD": s}))

`RUN/eval/step_XXXXXX/` are `opsd-eval`-format directories (the trainer's periodic evaluation; the demo writes
the step-0 one with `opsd-eval` on the warm start). The first and the last are compared problem by problem
(`opsd_megatron.evaluation.paired`). Training signals come from metrics.jsonl: divergence and rollout accuracy
averaged over the first and the last `window` steps, and the mean trainer-vs-engine logprob drift.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from opsd_megatron.evaluation.paired import paired_difference
from opsd_megatron.observe.metrics import read_metrics


def _eval_dirs(run: Path) -> list[tuple[int, Path]]:
    out = []
    for d in (run / "eval").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / "generations.jsonl").is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return sum(vals) / len(vals) if vals else float("nan")


def learning_summary(run_dir: str | Path, window: int = 3) -> dict[str, float]:
    """Before/after held-out accuracy and training signals of one run (see the module docstring)."""
    run = Path(run_dir)
    evals = _eval_dirs(run)
    if len(evals) < 2:
        raise FileNotFoundError(
            f"{str(run / 'eval')!r} needs at least two evaluations (step_000000 and a later one), found "
            f"{[s for s, _ in evals]}."
        )
    out = paired_difference(evals[0][1], evals[-1][1])
    out.update(before_step=float(evals[0][0]), after_step=float(evals[-1][0]))
    rows = read_metrics(run)
    first, last = rows[:window], rows[-window:]
    # OPSD logs its divergence as `loss` (older runs also as `divergence`)
    div_key = "divergence" if any("divergence" in r for r in rows) else "loss"
    for key, name in ((div_key, "divergence"), ("rollout/accuracy", "rollout_accuracy")):
        out[f"{name}_first"] = _mean(first, key)
        out[f"{name}_last"] = _mean(last, key)
    out["drift"] = _mean(rows, "drift/mean_abs_logprob")
    out["steps"] = float(len(rows))
    return out


def _pct(x: float, half: float | None = None) -> str:
    return f"{100 * x:5.1f}" + (f" ± {100 * half:4.1f}" if half is not None else "")


def format_learning_table(runs: dict[str, dict[str, float]]) -> str:
    """A markdown table, one row per named run summary."""
    head = ("| run | held-out before (%) | after (%) | gain (pts, 95% CI) | divergence first → last "
            "| rollout acc. first → last (%) | drift |")  # fmt: skip
    lines = [head, "|" + "---|" * 7]
    for name, s in runs.items():
        lines.append(
            f"| {name} | {_pct(s['before'], s['before_half'])} | {_pct(s['after'], s['after_half'])} "
            f"| {100 * s['diff']:+.1f} ± {100 * s['half']:.1f} "
            f"| {s['divergence_first']:.4f} → {s['divergence_last']:.4f} "
            f"| {_pct(s['rollout_accuracy_first'])} → {_pct(s['rollout_accuracy_last'])} | {s['drift']:.1e} |"
        )
    n = next(iter(runs.values()))
    lines.append(f"\n{int(n['num_problems'])} held-out problems; Avg@n over samples per problem; "
                 "CI = 1.96 standard errors over problems (gain: paired per problem).")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m opsd_megatron.observe.learning", description=__doc__.split("\n")[0]
    )
    ap.add_argument("run_dirs", nargs="+", help="NAME=RUN_DIR or RUN_DIR")
    a = ap.parse_args(argv)
    runs = {}
    for spec in a.run_dirs:
        name, _, path = spec.rpartition("=")
        runs[name or path] = learning_summary(path)
    print(format_learning_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
