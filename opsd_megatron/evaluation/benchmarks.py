"""Evaluation benchmarks: a local jsonl/json/parquet file or a hub dataset, with named field presets.

    load_benchmark("aime24")                          # preset: its usual hub copy, fields mapped
    load_benchmark("aime24=/data/aime24.jsonl")       # preset field mapping over your own file
    load_benchmark("/data/my_set.jsonl", problem_field="question", answer_field="final")

A preset only names a schema (where the problem and the final answer live, and the usual hub source and
split); the user supplies the data. When a preset's field is missing from a row, common alternatives
(`problem`/`question`/`Problem`, `answer`/`Answer`/`final_answer`/`expected_answer`) are tried, so a
re-exported copy of the same set still loads. File reading is shared with the training data
(`opsd_megatron.data.loading.read_rows`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from opsd_megatron.data.loading import read_rows

PROBLEM_FALLBACKS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_FALLBACKS = ("answer", "Answer", "final_answer", "expected_answer", "solution_answer")


@dataclass(frozen=True)
class BenchmarkPreset:
    """Schema of a well-known benchmark (the data itself is the user's)."""

    source: str
    """Hub dataset name used when no file is given."""
    split: str
    """Hub split."""
    problem_field: str
    """Row field holding the problem statement."""
    answer_field: str
    """Row field holding the final answer."""
    id_field: str | None = None
    """Row field with a stable problem id (None: the row index)."""
    subset: str | None = None
    """Hub config name, if the dataset has several."""


PRESETS: dict[str, BenchmarkPreset] = {
    "aime24": BenchmarkPreset("HuggingFaceH4/aime_2024", "train", "problem", "answer", "id"),
    "aime25": BenchmarkPreset("math-ai/aime25", "test", "problem", "answer", "id"),
    "hmmt25": BenchmarkPreset("MathArena/hmmt_feb_2025", "train", "problem", "answer", "problem_idx"),
    "math500": BenchmarkPreset("HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id"),
    "amc23": BenchmarkPreset("math-ai/amc23", "test", "question", "answer", "id"),
}
"""Named schemas: `--benchmark aime24` (hub) or `--benchmark aime24=FILE` (your copy)."""


@dataclass(frozen=True)
class EvalItem:
    """One problem of a benchmark."""

    key: str
    """Stable identity used for resuming: the id field (or row index) plus a hash of problem and answer."""
    problem: str
    """Problem statement."""
    answer: str
    """Reference final answer."""
    solution: str = ""
    """Worked reference solution (the row's `solution` field, "" without one): `opsd-eval --privileged`."""


@dataclass
class Benchmark:
    """A loaded benchmark."""

    name: str
    """Display name (preset name or file stem); keys of the metrics."""
    source: str
    """Where the rows came from (file path or `hub:NAME`)."""
    items: list[EvalItem]
    """The problems, in source order."""


def _pick(
    row: dict, field: str | None, fallbacks: tuple[str, ...], strict: bool
) -> tuple[str | None, object]:
    """(field name, value) of the first of `field`, then `fallbacks` (unless `strict`), present in `row`."""
    if field is not None and field in row:
        return field, row[field]
    for f in () if strict else fallbacks:
        if f in row:
            return f, row[f]
    return None, None


def _answer_str(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # AMC copies store 27.0
    return str(value).strip()


def load_benchmark(
    spec: str,
    *,
    problem_field: str | None = None,
    answer_field: str | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> Benchmark:
    """Load `spec` = PRESET | PRESET=PATH | PATH | HUB_NAME.

    Fields given here override the preset's and must exist; a preset's (or no) field also tries the
    common alternatives. `split` defaults to the preset's, else "test"; `limit` keeps the first rows.

    Raises ValueError naming the benchmark, row and field when a row lacks a problem or an answer.
    """
    strict_problem, strict_answer = problem_field is not None, answer_field is not None  # user-given
    name, sep, path = spec.partition("=")
    preset = PRESETS.get(name.lower())
    if sep and preset is None and ("/" in name or Path(spec).expanduser().exists()):
        name, path = spec, ""  # a path that merely contains "="
    elif sep and preset is None:
        raise ValueError(
            f"benchmark {spec!r}: {name!r} is not a preset; expected one of {', '.join(PRESETS)} before '='."
        )
    if preset is not None:
        source, name = (path or preset.source), name.lower()
        split = split or preset.split
        problem_field = problem_field or preset.problem_field
        answer_field = answer_field or preset.answer_field
        subset = None if path else preset.subset
        id_field = preset.id_field
    else:
        source, subset, id_field = spec, None, None
        name = Path(spec).stem if Path(spec).suffix else spec.rstrip("/").split("/")[-1]
        split = split or "test"
    rows, where = read_rows(source, split, subset)
    items: list[EvalItem] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(
                f"benchmark {name!r} ({where}) row {i} is a {type(row).__name__}, expected an object."
            )
        pf, problem = _pick(row, problem_field, PROBLEM_FALLBACKS, strict_problem)
        af, answer = _pick(row, answer_field, ANSWER_FALLBACKS, strict_answer)
        for label, f, want, val in (
            ("problem", pf, problem_field, problem),
            ("answer", af, answer_field, answer),
        ):
            if f is None or val is None or (isinstance(val, str) and not val.strip()):
                raise ValueError(
                    f"benchmark {name!r} ({where}) row {i} has no {label} field "
                    f"{want or '/'.join(PROBLEM_FALLBACKS if label == 'problem' else ANSWER_FALLBACKS)!r} "
                    f"(fields: {', '.join(map(str, row))}); pass --{label}-field."
                )
        rid = row.get(id_field, i) if id_field else i
        digest = hashlib.sha1(f"{problem}\x00{answer}".encode()).hexdigest()[:10]
        sol = row.get("solution")
        items.append(EvalItem(f"{rid}:{digest}", str(problem), _answer_str(answer), str(sol or "")))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"benchmark {name!r} ({where}) has no rows.")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):  # duplicate ids in the source: fall back to row index + hash
        items = [
            EvalItem(f"{i}:{it.key.split(':')[-1]}", it.problem, it.answer, it.solution)
            for i, it in enumerate(items)
        ]
    return Benchmark(name, where, items)
