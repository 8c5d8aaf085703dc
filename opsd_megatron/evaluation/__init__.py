"""Evaluation: final-answer extraction, math-verify grading in worker processes, Avg@n / Pass@k / Maj@n.

    from opsd_megatron.evaluation import extract_boxed, grade, evaluate
    grade("... \\\\boxed{0.5}", "\\\\frac12")   # True

Submodules: `extract` (boxed answers, string normalisation), `grader` (GraderPool: killable math-verify
workers), `metrics` (unbiased Pass@k, Avg@n, Maj@n), `benchmarks` (local files / hub sets, presets for
AIME24, AIME25, HMMT25, MATH500, AMC23), `runner` (generation + grading + resume: `evaluate`), `report`
(terminal table, summary JSON), `hook` (`periodic_eval` for the trainer), `model` (HF dir or Megatron
checkpoint export). Nothing here imports vLLM or torch at import time.
"""

from opsd_megatron.evaluation.benchmarks import PRESETS, Benchmark, load_benchmark
from opsd_megatron.evaluation.extract import extract_answer, extract_boxed, normalize_answer, strip_units
from opsd_megatron.evaluation.grader import GradeResult, GraderPool, default_pool, grade
from opsd_megatron.evaluation.hook import periodic_eval
from opsd_megatron.evaluation.report import flat_metrics, format_table
from opsd_megatron.evaluation.runner import EVAL_TEMPLATE, evaluate
from opsd_megatron.evaluation.scores import benchmark_metrics, pass_at_k

__all__ = [
    "EVAL_TEMPLATE",
    "PRESETS",
    "Benchmark",
    "GradeResult",
    "GraderPool",
    "benchmark_metrics",
    "default_pool",
    "evaluate",
    "extract_answer",
    "extract_boxed",
    "flat_metrics",
    "format_table",
    "grade",
    "load_benchmark",
    "normalize_answer",
    "pass_at_k",
    "periodic_eval",
    "strip_units",
]
