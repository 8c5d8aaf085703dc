"""Grader: answer extraction and math-verify grading on pairs a careless grader gets wrong; the worker pool
kills a hung item (graded wrong, status "timeout") without stalling the rest of the batch."""

from __future__ import annotations

import time

import pytest

from opsd_megatron.evaluation import (
    GraderPool,
    default_pool,
    extract_answer,
    extract_boxed,
    grade,
    normalize_answer,
    strip_units,
)


def B(s: str) -> str:
    return "The answer is \\boxed{" + s + "}."


# (response text, reference answer, expected verdict)
PAIRS = [
    # --- extraction: nested braces, several boxes, no box, fbox, truncation
    (B(r"\frac{1}{2}"), "1/2", True),
    (B(r"\frac{\sqrt{3}}{2}"), r"\frac{\sqrt3}{2}", True),
    (B(r"\sqrt{\frac{1}{4}}"), "0.5", True),
    (B(r"2^{\frac{1}{2}}"), r"\sqrt{2}", True),
    (r"First \boxed{3}. Wait, recheck: \boxed{5}", "5", True),
    (r"First \boxed{5}. Wait, recheck: \boxed{3}", "5", False),
    (r"\boxed{5} is tempting but the final answer is \boxed{7}", "7", True),
    ("The answer is 5.", "5", False),
    ("5", "5", False),
    (r"$\boxed{}$ so 5", "5", False),
    (r"\fbox{12}", "12", True),
    (r"so \boxed 7 holds", "7", True),
    (r"\boxed{5} then \boxed{6", "5", True),
    (r"\boxed{\{1, 2\}}", r"\{1,2\}", True),
    (r"\boxed{\text{(B)}} and \boxed{4", "B", True),
    (r"<think>maybe \boxed{4}</think> final: \boxed{9}", "9", True),
    (r"<think>maybe \boxed{9}</think> final: \boxed{4}", "9", False),
    (r"\boxed{\boxed{8}}", "8", True),
    # --- equivalent forms that must pass
    (B(r"\frac12"), "0.5", True),
    (B("0.5"), r"\frac{1}{2}", True),
    (B(r"\dfrac{1}{2}"), r"\frac{1}{2}", True),
    (B(r"\tfrac{3}{4}"), "0.75", True),
    (B(r"-\frac{2}{3}"), r"\frac{-2}{3}", True),
    (B("3.5"), r"\frac{7}{2}", True),
    (B("204.0"), "204", True),
    (B("1,000"), "1000", True),
    (B(r"2^{10}"), "1024", True),
    (B(r"6\sqrt{2}"), r"\sqrt{72}", True),
    (B(r"\frac{\sqrt{2}}{2}"), r"\frac{1}{\sqrt{2}}", True),
    (B(r"3\pi"), r"3 \pi", True),
    (B(r"\pi \cdot 3"), r"3\pi", True),
    (B(r"(x+1)^2"), "x^2+2x+1", True),
    (B(r"\{2, 1\}"), r"\{1,2\}", True),
    (B(r"[1, 2)"), r"[1,2)", True),
    (B(r"(-\infty, 3]"), r"(-\infty,3]", True),
    (B(r"\left( 3, \frac{\pi}{2} \right)"), r"\left( 3, \frac{\pi}{2} \right)", True),
    (B(r"(3,\tfrac{\pi}{2})"), r"\left( 3, \frac{\pi}{2} \right)", True),
    (B(r"10\text{ cm}"), "10", True),
    (B(r"90^\circ"), "90", True),
    (B(r"90^{\circ}"), r"90", True),
    (B(r"\$18.90"), "18.90", True),
    (B(r"x = 3"), "3", True),
    (B(r"\text{Evelyn}"), r"\text{Evelyn}", True),
    (B(r"\text{(C)}"), r"\text{(C)}", True),
    (B(r"25\%"), "25", True),
    (B(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"), r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),
    (B(r"\infty"), r"\infty", True),
    (B("0.50"), "0.5", True),
    (B(r"\frac{9}{3}"), "3", True),
    (B(r"\sqrt{16}"), "4", True),
    (B(r"\log_2 8"), "3", True),
    (B(r"\binom{5}{2}"), "10", True),
    # --- near misses that must fail
    (B(r"[1,2]"), "[1,2)", False),
    (B(r"(1,2)"), "(2,1)", False),
    (B(r"\{1,2\}"), r"\{1,2,3\}", False),
    (B(r"(0,1)"), "[0,1]", False),
    (B("0.333"), r"\frac{1}{3}", False),
    (B("3.14"), r"\pi", False),
    (B("-5"), "5", False),
    (B("1023"), r"2^{10}", False),
    (B("50"), "5", False),
    (B("2040"), "204", False),
    (B("21"), "12", False),
    (B(r"\frac{1}{3}"), r"\frac{1}{2}", False),
    (B(r"\frac{2}{1}"), r"\frac{1}{2}", False),
    (B(r"x^3"), "x^2", False),
    (B(r"\sqrt{2}"), "2", False),
    (B(r"2\sqrt{3}"), r"3\sqrt{2}", False),
    (B("0.51"), "0.5", False),
    (B(r"\text{Evelin}"), r"\text{Evelyn}", False),
    (B(r"\text{(D)}"), r"\text{(C)}", False),
    (B("100"), r"10\%", False),
    (B(r"(-\infty, 3)"), r"(-\infty,3]", False),
    (B("10"), "100", False),
    (B(r"x=4"), "3", False),
    (B(r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}"), r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", False),
    (B(r"-\infty"), r"\infty", False),
    # --- answers split over several boxes (Math-Verify grades their union), units, percent (extract.py)
    (r"so $\boxed{(1, 4)}$ \quad \text{and} \quad $\boxed{(4, 1)}$", "(1, 4), (4, 1)", True),
    (r"the roots are \boxed{-3} and \boxed{2}", "2, -3", True),
    (r"$x_1 = \boxed{7}$, $x_2 = \boxed{-1}$", "x = 7, x = -1", True),
    (r"\boxed{2}, \boxed{3}, \boxed{5}", r"\{2, 3, 5\}", True),
    (r"\boxed{4} \text{ for (i) and } \boxed{9}", "4, 9", True),
    (r"the roots are \boxed{-3} and \boxed{2}", "2", False),  # the union, not the last box
    (r"\boxed{1} and \boxed{6}", "1, 5", False),
    (r"First \boxed{4}; on reflection the answer is \boxed{6}", "4, 6", False),  # a correction: last box
    (B(r"7\text{ cm}"), r"\frac{14}{2}", True),
    (B(r"\text{7 cm}"), "7", True),
    (B(r"7\text{ cm}^2"), "7", True),
    (B("7 cm"), "7", True),
    (B(r"\text{7 cm}"), "8", False),
    (B("7x"), "7", False),  # a variable is not a unit
    (B(r"0.5\%"), "0.005", True),  # decision: p% matches p/100 ...
    (B(r"0.5\%"), "0.5", True),  # ... and p (the question asked for a percentage)
    (B("0.5"), "0.005", False),  # without the % sign the two readings differ
    (B(r"0.5\%"), "0.05", False),
]

PATHOLOGICAL = B(
    r"9^{9^{9^{9}}}"
)  # sympy evaluates the power tower forever (C-level bigint: no signal helps)


@pytest.fixture(scope="module")
def pool():
    return default_pool()  # the process-wide pool behind grade(): workers start once per test session


@pytest.fixture(scope="module")
def verdicts(pool):
    """Every pair graded in one parallel batch (60 s per item: nothing should hang; CI may be loaded)."""
    return pool.grade_many([(r, a) for r, a, _ in PAIRS], timeout_s=60.0)


def test_enough_pairs_of_each_kind():
    assert len(PAIRS) >= 60
    assert sum(e for *_, e in PAIRS) >= 25 and sum(not e for *_, e in PAIRS) >= 25


@pytest.mark.parametrize("i", range(len(PAIRS)), ids=[f"{a[-30:]}|{b}" for a, b, _ in PAIRS])
def test_grade_pair(verdicts, i):
    response, reference, expected = PAIRS[i]
    got = verdicts[i]
    assert got.correct is expected, f"{response!r} vs {reference!r}: {got}"
    assert got.status in ("string_match", "math_verify", "no_answer")  # nothing timed out or crashed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"a \boxed{1} b \boxed{ 2 } c", "2"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are content
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),  # unbalanced escaped brace inside
        (r"\fbox{7}", "7"),
        (r"\boxed 5$", "5"),
        (r"\boxed{3} \boxed{4", "3"),  # unclosed last box: previous complete one
        (r"\boxed{4", None),
        (r"\boxed{}", None),
        (r"\boxedfoo{3}", None),  # another command, not a box
        ("no box at all", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}", "(2, 2), (6, 2)"),
        (r"$\boxed{1}$, $\boxed{2}$ or $\boxed{3}$", "1, 2, 3"),
        (r"\( y_1 = \boxed{x+1} \) and \( y_2 = \boxed{x-1} \)", "x+1, x-1"),
        (r"\boxed{5} and \boxed{5}", "5"),  # a repeated box is one answer
        (r"First \boxed{3}. Wait, recheck: \boxed{5}", "5"),  # other text between: last-box rule
        (r"\boxed{3} \text{ is wrong, } \boxed{5}", "5"),
        (r"<think>\boxed{4}</think> final: \boxed{9}", "9"),
        (r"\boxed{\boxed{8}}", "8"),  # nested: the inner box
        (r"\boxed{1} and \boxed{2", "1"),  # unclosed last box
        (r"\boxed{}", None),
        ("no box", None),
    ],
)
def test_extract_answer_joins_split_boxes(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        (r"5\text{ cm}", "5"),
        (r"\text{5 cm}", "5"),
        (r"12\mbox{ m}^2", "12"),
        (r"\frac{1}{2}\text{ m}", r"\frac{1}{2}"),
        ("30 degrees", "30"),
        ("2,500 dollars", "2,500"),
        ("5x", "5x"),  # a variable, not a unit
        ("5 m", "5 m"),  # single letters are left alone outside a text command
        (r"3\text{ and }4", r"3\text{ and }4"),
        (r"\text{(B)}", r"\text{(B)}"),
    ],
)
def test_strip_units(answer, expected):
    assert strip_units(answer) == expected


def test_extract_is_linear_on_adversarial_text():
    t = time.monotonic()
    assert extract_boxed("\\boxed{" * 200_000) is None  # quadratic scanning would take minutes
    assert extract_boxed("{" * 100_000 + "\\boxed{1}") == "1"
    assert extract_answer("\\boxed{1} and " * 20_000) == "1"  # repeated boxes collapse, still linear
    assert time.monotonic() - t < 5.0


def test_normalize_answer_keeps_values():
    assert normalize_answer(r"\dfrac{1}{2}") == normalize_answer(r"\frac{1}{2}")
    assert normalize_answer("2.50") == "2.5" and normalize_answer("204.0") == "204"
    assert normalize_answer("1,000") == "1000" and normalize_answer("(1,000)") == "(1,000)"
    assert normalize_answer(r"\text{ Evelyn }") == "Evelyn"
    assert normalize_answer("120") != normalize_answer("12")


def test_pathological_answer_times_out_without_stalling(pool, verdicts):
    before = pool.num_timeouts
    batch = [(PATHOLOGICAL, "5")] + [(B(f"{k}"), f"{k}.0") for k in range(6)] + [(B("x^2+2x+1"), "(x+1)^2")]
    t = time.monotonic()
    res = pool.grade_many(batch, timeout_s=4.0)
    elapsed = time.monotonic() - t
    assert res[0].correct is False and res[0].status == "timeout" and res[0].answer == r"9^{9^{9^{9}}}"
    assert all(r.correct for r in res[1:]), res
    assert pool.num_timeouts == before + 1
    assert elapsed < 60.0  # the hung worker was killed after 4 s and replaced; the batch finished
    # the replaced worker grades normally afterwards
    assert [r.correct for r in pool.grade_many([(B(r"\frac{6}{4}"), "1.5"), (B("1.4"), "1.5")])] == [
        True,
        False,
    ]


def test_public_grade(pool):
    assert grade(r"so $\boxed{\dfrac{3}{6}}$", "0.5") is True
    assert grade(r"so $\boxed{\dfrac{3}{7}}$", "0.5") is False
    assert grade("no box", "0.5") is False


def test_bad_timeout_is_a_clear_error():
    with pytest.raises(ValueError, match="timeout_s"):
        GraderPool(timeout_s=0)
