"""`opsd-eval` argument handling and `--model` resolution: user errors are one clear sentence, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd_megatron.cli.eval import build_parser, main
from opsd_megatron.evaluation.model import resolve_model_dir

DATA = Path(__file__).parent / "data"


def test_parser_defaults_follow_the_paper():
    a = build_parser().parse_args(["--model", "m", "--benchmark", "aime24"])
    assert (a.n, a.temperature, a.top_p, a.max_new_tokens, a.thinking) == (12, 1.0, 0.95, 38912, True)
    assert a.grader_timeout == 5.0 and a.engine == "vllm"
    assert build_parser().parse_args(["--model", "m", "--benchmark", "x", "--no-thinking"]).thinking is False


def test_resolve_model_dir(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_dir(str(hf), tmp_path) == str(hf)
    assert resolve_model_dir("Qwen/Qwen3-1.7B", tmp_path) == "Qwen/Qwen3-1.7B"  # hub names pass through
    run = tmp_path / "run"
    (run / "step_000004").mkdir(parents=True)
    (run / "latest").write_text("step_000004")
    with pytest.raises(ValueError, match="no complete training checkpoint \\(step_000004: no opsd_state"):
        resolve_model_dir(str(run), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Hugging Face directory"):
        resolve_model_dir(str(tmp_path / "empty"), tmp_path)


def test_cli_reports_user_errors(tmp_path, capsys):
    rc = main(
        ["--model", str(tmp_path), "--benchmark", str(DATA / "eval_tiny.jsonl"), "--answer-field", "sol"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "row 0 has no answer field 'sol'" in err
    rc = main(["--model", str(tmp_path / "nope"), "--benchmark", str(DATA / "eval_tiny.jsonl")])
    assert rc == 2 and "neither a Hugging Face directory" in capsys.readouterr().err
    rc = main(["--model", "m", "--benchmark", str(tmp_path / "missing.jsonl")])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
