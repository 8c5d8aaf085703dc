"""Data loading: builtin set, jsonl/json/parquet, field names; bad rows error (naming the row) or skip."""

from __future__ import annotations

import json

import pytest

from opsd_megatron.config import DataConfig
from opsd_megatron.data import DataError, PromptSampler, load_problems

pytestmark = pytest.mark.no_mcore  # never imports megatron: run once (tests/no_mcore.py)


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_builtin_tiny_math_is_consistent():
    problems, stats = load_problems(DataConfig(path="builtin:tiny_math"))
    assert 40 <= len(problems) <= 64 and stats["skipped"] == 0
    for p in problems:
        assert p.answer and f"\\boxed{{{p.answer}}}" in p.solution, p


def test_fields_formats_and_max_samples(tmp_path):
    rows = [{"q": f"p{i}", "s": f"s{i}", "a": i} for i in range(5)]
    f = _write(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(path=f, problem_field="q", solution_field="s", answer_field="a", max_samples=3)
    problems, _ = load_problems(cfg)
    assert [(p.problem, p.solution, p.answer) for p in problems] == [
        ("p0", "s0", "0"),
        ("p1", "s1", "1"),
        ("p2", "s2", "2"),
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert (
        len(
            load_problems(DataConfig(path=str(tmp_path / "d.json"), problem_field="q", solution_field="s"))[0]
        )
        == 5
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
    cfg = DataConfig(
        path=str(tmp_path / "d.parquet"), problem_field="q", solution_field="s", answer_field=None
    )
    problems, _ = load_problems(cfg)
    assert len(problems) == 5 and problems[0].answer is None


BAD_ROWS = [
    ({"solution": "s"}, "row 1 has no field 'problem'"),
    ({"problem": "", "solution": "s"}, "row 1 field 'problem' is empty"),
    ({"problem": "p", "solution": "   "}, "row 1 field 'solution' is empty"),
    ({"problem": 3, "solution": "s"}, "row 1 field 'problem' is int, expected a string"),
    ({"problem": "p", "solution": None}, "row 1 field 'solution' is NoneType, expected a string"),
    ([1, 2], "row 1 is a list, expected an object"),
    ('{"problem": "p", ', "line 2 is not valid JSON"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_row_error_names_row_or_is_skipped(tmp_path, bad, message):
    f = _write(
        tmp_path / "d.jsonl", [{"problem": "p0", "solution": "s0"}, bad, {"problem": "p2", "solution": "s2"}]
    )
    with pytest.raises(DataError) as e:
        load_problems(DataConfig(path=f))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    if "JSON" not in message:
        problems, stats = load_problems(DataConfig(path=f, on_bad_row="skip"))
        assert [p.problem for p in problems] == ["p0", "p2"] and stats["skipped"] == 1


def test_missing_path_and_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_problems(DataConfig(path=str(tmp_path / "none.jsonl")))
    f = _write(tmp_path / "d.jsonl", [{"problem": "", "solution": "s"}])
    with pytest.raises(DataError, match=r"has no usable rows \(1 read, 1 skipped\)"):
        load_problems(DataConfig(path=f, on_bad_row="skip"))


def test_sampler_is_a_pure_function_of_step():
    a, b = PromptSampler(10, 4, seed=3), PromptSampler(10, 4, seed=3)
    seq = [a.indices(k) for k in range(6)]
    assert [b.indices(k) for k in reversed(range(6))] == list(reversed(seq))
    flat = [i for s in seq[:5] for i in s]  # 20 = two epochs
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert a.replica_slice(2, 1, 2) == seq[2][2:]
    assert PromptSampler(10, 4, seed=3, shuffle=False).indices(1) == [4, 5, 6, 7]
