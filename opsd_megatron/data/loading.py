"""Load OPSD training problems (problem, worked solution, optional answer) from a file, a folder or the hub.

    problems, stats = load_problems(cfg.data)        # cfg.data: opsd_megatron.config.DataConfig

Sources (`data.path`): a local `.jsonl` / `.json` / `.parquet` file, a directory of such files,
`builtin:tiny_math` (the small set shipped with the package), or a `datasets` hub name (`data.subset`,
`data.split`). Field names are configurable. A row whose problem or solution is missing, not a string or empty
is an error naming the file and row (`data.on_bad_row: error`, the default) or is skipped and counted
(`skip`); `stats["skipped"]` reports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN = {"builtin:tiny_math": Path(__file__).with_name("tiny_math.jsonl")}
_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A user error in the training data (message names the file/row/field)."""


@dataclass(frozen=True)
class Problem:
    """One training example."""

    problem: str
    """Problem statement (the student's input)."""
    solution: str
    """Worked reference solution (the teacher's privileged input)."""
    answer: str | None
    """Final answer for rollout accuracy (None when the data has none)."""
    row: int
    """Row index in the source (0-based), for error messages and logs."""


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"data file {str(path)!r} line {lineno} is not valid JSON ({e.msg})."
                ) from None
    return rows


def _read_file(path: Path) -> list[Any]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return _read_jsonl(path)  # JSON lines saved as .json
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]}
        if not isinstance(data, list):
            raise DataError(f"data file {str(path)!r} must hold a JSON list of rows (or JSON lines).")
        return data
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # heavy; `import opsd_megatron.config` (which reaches data/) stays cheap

        return pq.read_table(str(path)).to_pylist()
    raise DataError(
        f"data file {str(path)!r} has an unsupported suffix; expected one of {', '.join(_SUFFIXES)}."
    )


def read_rows(path: str, split: str = "train", subset: str | None = None) -> tuple[list[Any], str]:
    """Raw rows and a display name of the source."""
    src = BUILTIN.get(path)
    p = src if src is not None else Path(path).expanduser()
    if p.is_file():
        return _read_file(p), str(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in _SUFFIXES)
        if split:
            in_split = [f for f in files if f.stem.startswith(split)]
            files = in_split or files
        if not files:
            raise DataError(f"data directory {str(p)!r} has no {'/'.join(_SUFFIXES)} files.")
        return [r for f in files for r in _read_file(f)], str(p)
    if path.startswith(("/", "./", "../", "~")) or Path(path).suffix in _SUFFIXES:
        raise DataError(f"data.path {path!r} does not exist.")
    import datasets  # heavy (seconds); only for hub datasets, and keeps `import opsd_megatron.config` cheap

    try:
        ds = datasets.load_dataset(path, subset, split=split)
    except Exception as e:  # hub/network errors come in many types
        raise DataError(
            f"data.path {path!r}: could not load hub dataset ({type(e).__name__}: {e})."
        ) from None
    return list(ds), f"hub:{path}"


def _field(row: dict, name: str) -> Any:
    return row.get(name) if isinstance(row, dict) else None


def load_problems(cfg: Any) -> tuple[list[Problem], dict]:
    """Read and validate rows per a `DataConfig`; returns (problems, {"rows", "skipped", "source"})."""
    rows, source = read_rows(cfg.path, cfg.split, cfg.subset)
    problems: list[Problem] = []
    skipped = 0
    for i, row in enumerate(rows):
        error = None
        if not isinstance(row, dict):
            error = f"is a {type(row).__name__}, expected an object with fields"
        else:
            for name in (cfg.problem_field, cfg.solution_field):
                val = row.get(name)
                if name not in row:
                    error = f"has no field {name!r} (fields: {', '.join(sorted(map(str, row))) or 'none'})"
                elif not isinstance(val, str):
                    error = f"field {name!r} is {type(val).__name__}, expected a string"
                elif not val.strip():
                    error = f"field {name!r} is empty"
                if error:
                    break
        if error:
            if cfg.on_bad_row == "skip":
                skipped += 1
                continue
            raise DataError(f"data {source!r} row {i} {error} (set data.on_bad_row: skip to skip such rows).")
        answer = _field(row, cfg.answer_field) if cfg.answer_field else None
        answer = None if answer is None else str(answer)
        problems.append(Problem(row[cfg.problem_field], row[cfg.solution_field], answer, i))
        if cfg.max_samples is not None and len(problems) >= cfg.max_samples:
            break
    if not problems:
        raise DataError(f"data {source!r} has no usable rows ({len(rows)} read, {skipped} skipped).")
    return problems, {"rows": len(rows), "skipped": skipped, "source": source}
