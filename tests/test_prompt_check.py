"""Start-up check of every row's rendered student and teacher prompt (opsd_megatron.data.prompt_check):
lengths equal those of `render_pair` (what the trainer feeds the engine), too-long rows are skipped and
counted or are one error naming the row, the prompt and the key, per data.on_bad_row."""

from __future__ import annotations

import pytest

from opsd_megatron.config import PromptConfig
from opsd_megatron.data.loading import DataError, Problem
from opsd_megatron.data.prompt_check import drop_overlong_rows, find_bad_rows


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _problems():
    return [
        Problem("What is 2 + 3?", "2 + 3 = 5, so \\boxed{5}.", "5", 0),
        Problem("What is 1 + 1? " * 100, "2", "2", 1),  # long student and teacher prompt
        Problem("What is 4 - 1?", "4 - 1 = 3. " * 100, "3", 2),  # long teacher prompt only
        Problem("What is 7 x 6?", "\\boxed{42}", "42", 3),
    ]


def test_lengths_match_render_pair_and_limit_is_inclusive(tokenizer):
    from opsd_megatron.data.prompts import render_pair

    problems = _problems()
    lens = [max(map(len, render_pair(tokenizer, p.problem, p.solution, PromptConfig()))) for p in problems]
    cfg = PromptConfig(max_prompt_tokens=max(lens[0], lens[3]))
    assert set(find_bad_rows(problems, tokenizer, cfg)) == {1, 2}
    # split over 2 "ranks": the union is the same
    halves = [find_bad_rows(problems, tokenizer, cfg, rank=r, world_size=2) for r in (0, 1)]
    assert set(halves[0]) | set(halves[1]) == {1, 2} and not set(halves[0]) & set(halves[1])
    why = find_bad_rows(problems, tokenizer, cfg)[2]
    assert f"teacher prompt of {lens[2]} tokens" in why and "prompts.max_prompt_tokens" in why, why


def test_skip_counts_and_error_names_row_and_key(tokenizer):
    problems = _problems()
    cfg = PromptConfig(max_prompt_tokens=600)
    kept, dropped = drop_overlong_rows(problems, tokenizer, cfg, "skip")
    assert dropped == 2 and [p.row for p in kept] == [0, 3]
    match = r"data row 1 has a teacher prompt of \d+ tokens .*2 such row.*on_bad_row"
    with pytest.raises(DataError, match=match):
        drop_overlong_rows(problems, tokenizer, cfg, "error")
    with pytest.raises(DataError, match="every one of the 1 data rows"):
        drop_overlong_rows(problems[1:2], tokenizer, cfg, "skip")
    roomy = PromptConfig(max_prompt_tokens=10**6)
    assert drop_overlong_rows(problems, tokenizer, roomy, "error") == (problems, 0)


def test_eval_benchmarks_checked_at_start_up(tokenizer, tmp_path):
    """eval.path / eval.benchmarks: prompts rendered as the periodic evaluation renders them must fit
    prompts.max_prompt_tokens (the engine is sized from it); a missing benchmark is a start-up error too."""
    import json

    from opsd_megatron.config import ConfigError, EvalConfig
    from opsd_megatron.evaluation.runner import render_prompt_ids
    from opsd_megatron.evaluation.startup import check_eval_prompts

    bench = tmp_path / "bench.jsonl"
    rows = [{"id": "a", "problem": "What is 2 + 3?", "answer": "5"},
            {"id": "b", "problem": "What is 1 + 1? " * 60, "answer": "2"}]  # fmt: skip
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lens = [len(render_prompt_ids(tokenizer, r["problem"], thinking=True)) for r in rows]
    cfg = EvalConfig(interval=1, path=str(bench))
    assert check_eval_prompts(cfg, tokenizer, max(lens)) == 2  # the limit is inclusive
    too_long = rf"'eval.path': benchmark 'bench' problem '1:\w+' renders to a {lens[1]}-token prompt, more "
    with pytest.raises(ConfigError, match=too_long + rf"than prompts.max_prompt_tokens={lens[1] - 1}"):
        check_eval_prompts(cfg, tokenizer, lens[1] - 1)
    missing = EvalConfig(interval=1, benchmarks=[str(bench), str(tmp_path / "nope.jsonl")])
    with pytest.raises(ConfigError, match=r"'eval.benchmarks': benchmark '.*nope.jsonl' cannot be loaded"):
        check_eval_prompts(missing, tokenizer, 10_000)
