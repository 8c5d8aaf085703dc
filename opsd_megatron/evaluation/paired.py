"""Accuracy with a 95 % confidence interval, and the paired before/after difference of two evaluations.

    mean, half = accuracy_ci("runs/demo/opsd/eval/step_000000")          # Avg@n ± half
    d = paired_difference("runs/.../step_000000", "runs/.../step_000030")  # {"diff", "half", ...}

Reads `generations.jsonl` of `opsd_megatron.evaluation.runner` output directories. The unit is the problem:
its score is the fraction of its n samples graded correct, so the CI covers both the finite problem set and
the sampling (normal approximation, 1.96 standard errors of the mean over problems). The difference of two
evaluations of the SAME problems is paired per problem (the per-problem score differences), which is much
tighter than combining two independent intervals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

Z95 = 1.959963984540054


def per_problem_scores(eval_dir: str | Path) -> dict[tuple[str, str], float]:
    """(benchmark, problem key) -> fraction of its samples graded correct."""
    path = Path(eval_dir) / "generations.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (not an opsd-eval output directory).")
    hits: dict[tuple[str, str], list[bool]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            hits.setdefault((r["benchmark"], r["key"]), []).append(bool(r["correct"]))
    if not hits:
        raise ValueError(f"{str(path)!r} holds no graded samples.")
    return {k: sum(v) / len(v) for k, v in hits.items()}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, 95 % half-width) of `values` (normal approximation; half-width 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, Z95 * math.sqrt(var / n)


def accuracy_ci(eval_dir: str | Path) -> tuple[float, float]:
    """(Avg@n over problems, 95 % CI half-width) of one evaluation directory."""
    return mean_ci(list(per_problem_scores(eval_dir).values()))


def paired_difference(before_dir: str | Path, after_dir: str | Path) -> dict[str, float]:
    """Before/after accuracy on the problems both evaluated, and their paired difference with a 95 % CI.

    Returns {"before", "before_half", "after", "after_half", "diff", "half", "num_problems"}.
    """
    b, a = per_problem_scores(before_dir), per_problem_scores(after_dir)
    keys = sorted(set(b) & set(a))
    if not keys:
        raise ValueError(f"{str(before_dir)!r} and {str(after_dir)!r} share no problems.")
    before, bh = mean_ci([b[k] for k in keys])
    after, ah = mean_ci([a[k] for k in keys])
    diff, half = mean_ci([a[k] - b[k] for k in keys])
    return {"before": before, "before_half": bh, "after": after, "after_half": ah, "diff": diff, "half": half,
            "num_problems": float(len(keys))}  # fmt: skip
