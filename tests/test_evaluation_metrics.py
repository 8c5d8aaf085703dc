"""Metrics: unbiased Pass@k against hand-computed values and brute-force enumeration, Avg@n, Maj@n votes,
per-benchmark and overall aggregation, table and flat names."""

from __future__ import annotations

from itertools import combinations

import pytest

from opsd_megatron.evaluation import benchmark_metrics, flat_metrics, format_table, pass_at_k
from opsd_megatron.evaluation.scores import SampleVerdict, majority_correct, overall_metrics

V = SampleVerdict


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
        (12, 3, 4, 1 - 126 / 495),  # 1 - C(9,4)/C(12,4)
        (12, 3, 1, 3 / 12),  # Pass@1 = c/n
        (10, 0, 5, 0.0),
        (10, 10, 1, 1.0),
        (6, 2, 5, 1.0),  # n - c < k: every 5-subset holds a correct sample
        (6, 1, 6, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c", [(5, 2), (6, 3), (7, 1), (8, 5)])
def test_pass_at_k_equals_subset_enumeration(n, c):
    flags = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(combinations(range(n), k))
        brute = sum(any(flags[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(4, 1, 5)


def test_majority_vote_rules():
    # plurality of the wrong answer "7" (3 votes) beats 2 correct ones
    assert not majority_correct([V(True, "5"), V(False, "7"), V(False, "7"), V(True, "5"), V(False, "7")])
    # equivalent correct forms vote together: "1/2", "0.5", "\frac12" (3) beat "2" (2)
    assert majority_correct(
        [V(True, "1/2"), V(False, "2"), V(True, "0.5"), V(False, "2"), V(True, "\\frac12")]
    )
    # presentation-only differences of a wrong answer also vote together
    assert not majority_correct([V(False, "\\dfrac{1}{3}"), V(False, "\\frac{1}{3}"), V(True, "0.5")])
    # samples without an answer do not vote; a tie goes to the group seen first
    assert majority_correct([V(False, None), V(False, None), V(True, "4"), V(False, "3")])
    assert not majority_correct([V(False, "3"), V(True, "4")])
    assert not majority_correct([V(False, None)] * 3)


def test_benchmark_metrics_by_hand():
    items = [
        [V(True, "1"), V(True, "1"), V(False, "2"), V(False, None)],  # c=2, maj right
        [V(False, "9"), V(False, "9"), V(True, "3"), V(False, "8")],  # c=1, maj wrong
        [V(False, "0")] * 4,  # c=0
    ]
    m = benchmark_metrics(items)
    assert m["num_problems"] == 3 and m["n"] == 4
    assert m["avg@4"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert m["pass@1"] == pytest.approx(m["avg@4"])
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6) + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(1 / 3)
    assert [m[f"pass@{k}"] for k in range(1, 5)] == sorted(m[f"pass@{k}"] for k in range(1, 5))
    with pytest.raises(ValueError, match="same number of samples"):
        benchmark_metrics([[V(True, "1")], [V(True, "1"), V(False, "2")]])


def test_overall_micro_and_macro_and_report():
    a = benchmark_metrics([[V(True, "1"), V(True, "1")]] * 3)  # 3 problems, all right
    b = benchmark_metrics([[V(False, "1"), V(False, "2")]])  # 1 problem, wrong
    overall = overall_metrics({"a": a, "b": b})
    assert overall["num_problems"] == 4
    assert overall["avg@2"] == pytest.approx(3 / 4)  # problem-weighted
    assert overall["macro_avg@2"] == pytest.approx(1 / 2)  # benchmark mean
    summary = {"n": 2, "benchmarks": {"a": a, "b": b}, "overall": overall}
    flat = flat_metrics(summary, "eval")
    assert flat["eval/a/avg@2"] == 1.0 and flat["eval/overall/maj@2"] == pytest.approx(0.75)
    table = format_table(summary)
    assert "avg@2" in table and "pass@2" in table and "overall" in table and "mean(bench)" in table
    assert "75.0" in table and "50.0" in table
