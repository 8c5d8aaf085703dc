"""Sampling metrics over n graded samples per problem: Avg@n, unbiased Pass@k (every k <= n), Maj@n.

    pass_at_k(n=12, c=3, k=4)                       # 1 - C(9,4)/C(12,4) = 0.7455
    benchmark_metrics(items)                        # items: list[list[SampleVerdict]]

* Avg@n  = mean over problems of c/n (c = correct samples of a problem): the expected accuracy of one sample.
* Pass@k = mean over problems of 1 - C(n-c, k) / C(n, k): the unbiased estimator (Chen et al. 2021) of the
  chance that at least one of k samples drawn without replacement from the n is correct. Pass@1 == Avg@n.
* Maj@n  = mean over problems of [the most frequent answer is correct]. Votes are grouped by
  `normalize_answer`; answers graded correct are one group (they all equal the reference), samples without
  an answer do not vote; a tie goes to the group whose first sample came first. A problem where no sample
  has an answer counts as wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from opsd_megatron.evaluation.extract import normalize_answer


@dataclass(frozen=True)
class SampleVerdict:
    """What the metrics need of one graded sample."""

    correct: bool
    answer: str | None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one problem with `c` correct out of `n` samples (0 <= c <= n, 1 <= k <= n)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(samples: list[SampleVerdict]) -> bool:
    """Whether the majority-vote answer of one problem's samples is correct (rules: module docstring)."""
    votes: dict[str, int] = {}
    first: dict[str, int] = {}
    verdict: dict[str, bool] = {}
    for i, s in enumerate(samples):
        key = "\x00correct" if s.correct else normalize_answer(s.answer)
        if key is None:
            continue
        votes[key] = votes.get(key, 0) + 1
        first.setdefault(key, i)
        verdict.setdefault(key, s.correct)
    if not votes:
        return False
    best = max(votes, key=lambda k: (votes[k], -first[k]))
    return verdict[best]


def benchmark_metrics(items: list[list[SampleVerdict]]) -> dict[str, float]:
    """Metrics of one benchmark: `avg@n`, `pass@k` for k = 1..n, `maj@n`, `num_problems`, `n`.

    Every problem must have the same number n >= 1 of samples.
    """
    if not items:
        return {"num_problems": 0}
    n = len(items[0])
    if n < 1 or any(len(s) != n for s in items):
        raise ValueError(
            f"every problem needs the same number of samples (first has {n}); got counts "
            f"{sorted({len(s) for s in items})}."
        )
    counts = [sum(s.correct for s in samples) for samples in items]
    p = len(items)
    out: dict[str, float] = {"num_problems": p, "n": n}
    out[f"avg@{n}"] = sum(c / n for c in counts) / p
    for k in range(1, n + 1):
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / p
    out[f"maj@{n}"] = sum(majority_correct(samples) for samples in items) / p
    return out


def overall_metrics(per_benchmark: dict[str, dict[str, float]]) -> dict[str, float]:
    """Problem-weighted (micro) means of every metric shared by all benchmarks, plus `macro_` means.

    Micro: each problem counts once (the metric over the union of problems). Macro: each benchmark counts
    once (the plain mean of the per-benchmark numbers, what papers usually average).
    """
    present = {k: v for k, v in per_benchmark.items() if v.get("num_problems", 0) > 0}
    if not present:
        return {"num_problems": 0}
    keys = set.intersection(*(set(v) for v in present.values())) - {"num_problems", "n"}
    total = sum(v["num_problems"] for v in present.values())
    out: dict[str, float] = {"num_problems": total}
    for k in sorted(keys, key=_metric_order):
        out[k] = sum(v[k] * v["num_problems"] for v in present.values()) / total
        out[f"macro_{k}"] = sum(v[k] for v in present.values()) / len(present)
    return out


def _metric_order(key: str) -> tuple[int, int, str]:
    name, _, k = key.partition("@")
    order = {"avg": 0, "pass": 1, "maj": 2}.get(name, 3)
    return (order, int(k) if k.isdigit() else 0, key)
