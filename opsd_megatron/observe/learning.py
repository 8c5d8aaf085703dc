"""Did the run learn? Held-out accuracy before/after (paired 95 % CI) plus the run's training signals.

    s = learning_summary("runs/demo/opsd", evals="test")   # RUN/test/step_000000 and a later evaluation
    print(format_learning_table({"OPSD": s}))
    gain_failure(s)        # None, or why the gain does not count (its 95 % CI includes 0)

`RUN/<evals>/step_XXXXXX/` are `opsd-eval`-format directories: `eval/` the trainer's periodic evaluation (the
demo: the dev split, used to choose settings), `test/` the before/after evaluations of the test split (never
used to choose anything; the demo writes both with `opsd-eval`). The first and the last are compared problem
by problem (`opsd_megatron.evaluation.paired`) after `check_comparable` (one clear `LearningCheckError`
otherwise): the first is step 0, both cover the same problems, and their evaluation fingerprints (samples,
sampling settings with the seed, template, thinking, chat; `run_config.json`) are identical. Training signals
come from metrics.jsonl: divergence and rollout accuracy averaged over the first and the last `window` steps,
and the mean trainer-vs-engine logprob drift.

    python -m opsd_megatron.observe.learning --evals test --require-gain OPSD=runs/demo/opsd  # 1: no gain
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from opsd_megatron.evaluation.paired import paired_difference, per_problem_scores
from opsd_megatron.observe.metrics import read_metrics


class LearningCheckError(ValueError):
    """Two evaluations that cannot be compared (message names the directories and what differs)."""


_FINGERPRINT_KEYS = ("n", "sampling", "template", "thinking", "chat")
"""The evaluation settings that must match between before and after (run_config.json; not the model)."""


def check_comparable(before: tuple[int, Path], after: tuple[int, Path]) -> None:
    """Raise `LearningCheckError` unless `before` is step 0, both evaluated the same problems and their
    fingerprints (`_FINGERPRINT_KEYS` of run_config.json: samples, sampling settings and seed, template,
    thinking switch, chat) are identical. Arguments: (step, opsd-eval directory)."""
    (bs, bd), (as_, ad) = before, after
    if bs != 0:
        raise LearningCheckError(f"the 'before' evaluation {str(bd)!r} is step {bs}, not step 0.")
    if as_ <= 0:
        raise LearningCheckError(f"the 'after' evaluation {str(ad)!r} is step {as_}, not after step 0.")
    kb, ka = set(per_problem_scores(bd)), set(per_problem_scores(ad))
    if kb != ka:
        raise LearningCheckError(
            f"{str(bd)!r} and {str(ad)!r} evaluated different problems ({len(kb - ka)} only before, "
            f"{len(ka - kb)} only after)."
        )
    fps = []
    for d in (bd, ad):
        f = d / "run_config.json"
        if not f.is_file():
            raise LearningCheckError(f"{str(f)!r} does not exist: the evaluation's settings are unknown.")
        cfg = json.loads(f.read_text())
        fps.append({k: cfg.get(k) for k in _FINGERPRINT_KEYS})
    diff = [k for k in _FINGERPRINT_KEYS if fps[0][k] != fps[1][k]]
    if diff:
        raise LearningCheckError(
            f"{str(bd)!r} and {str(ad)!r} were evaluated with different settings: "
            + "; ".join(f"{k}: {fps[0][k]!r} vs {fps[1][k]!r}" for k in diff)
        )


def gain_failure(s: dict[str, float]) -> str | None:
    """Why a run's gain does not count (its paired 95 % CI includes 0 or lies below it), or None."""
    if s["diff"] - s["half"] > 0:
        return None
    return (f"the gain {100 * s['diff']:+.1f} ± {100 * s['half']:.1f} pts (95% CI over "
            f"{int(s['num_problems'])} problems) includes 0 or is negative")  # fmt: skip


def _eval_dirs(run: Path, evals: str = "eval") -> list[tuple[int, Path]]:
    out = []
    for d in (run / evals).glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / "generations.jsonl").is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return sum(vals) / len(vals) if vals else float("nan")


def learning_summary(run_dir: str | Path, window: int = 3, evals: str = "eval") -> dict[str, float]:
    """Before/after held-out accuracy (the first and last evaluation of `RUN/<evals>/`, checked with
    `check_comparable`) and training signals of one run (see the module docstring)."""
    run = Path(run_dir)
    found = _eval_dirs(run, evals)
    if len(found) < 2:
        raise FileNotFoundError(
            f"{str(run / evals)!r} needs at least two evaluations (step_000000 and a later one), found "
            f"{[s for s, _ in found]}."
        )
    check_comparable(found[0], found[-1])
    out = paired_difference(found[0][1], found[-1][1])
    out.update(before_step=float(found[0][0]), after_step=float(found[-1][0]))
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
    ap.add_argument("--evals", default="eval", help="RUN_DIR's folder of evaluations (eval, test).")
    ap.add_argument(
        "--require-gain", action="store_true", help="Exit 1 when a run's gain CI includes 0 (the first run)."
    )
    a = ap.parse_args(argv)
    runs = {}
    try:
        for spec in a.run_dirs:
            name, _, path = spec.rpartition("=")
            runs[name or path] = learning_summary(path, evals=a.evals)
    except LearningCheckError as e:
        print(f"learning: {e}", file=sys.stderr)
        return 2
    print(format_learning_table(runs))
    if a.require_gain:
        name, s = next(iter(runs.items()))
        why = gain_failure(s)
        if why:
            print(f"FAIL: {name}: {why}: nothing measurable was learned.")
            return 1
        print(f"PASS: {name}'s gain excludes 0.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
