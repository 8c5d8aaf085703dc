"""Checks that `opsd-eval` and `opsd-convert` do before any model or engine loads: output directories that
cannot be written, hub names offline, prompts longer than --max-model-len, answers that --max-new-tokens
would have cut. Each is one line naming the flag, exit code 2, and nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd_megatron.cli import convert as convert_cli
from opsd_megatron.cli.eval import main as eval_main
from opsd_megatron.config import ConfigError
from opsd_megatron.run.preflight import check_writable_dir

DATA = Path(__file__).parent / "data"
BENCH = str(DATA / "eval_tiny.jsonl")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_check_writable_dir_creates_nothing(tmp_path):
    check_writable_dir(str(tmp_path / "a" / "b"), "--out")  # a parent that can be written: fine
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"^--out: '.*/f/sub' cannot be a directory \('.*/f' is a file\)"):
        check_writable_dir(str(tmp_path / "f" / "sub"), "--out")
    with pytest.raises(ConfigError, match=r"^config key 'output_dir': "):
        check_writable_dir(str(tmp_path / "f"), "output_dir")


def test_eval_out_dir_in_the_way_is_one_line(tiny_qwen3_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc = eval_main(
        ["--model", str(tiny_qwen3_dir), "--benchmark", BENCH, "--out-dir", str(tmp_path / "f" / "o")]
    )
    assert rc == 2 and "--out-dir" in _one_line(capsys)


def test_eval_hub_name_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    rc = eval_main(["--model", "no-such-org/NoSuchModel-0B", "--benchmark", BENCH, "--out-dir", str(out)])
    line = _one_line(capsys)
    assert rc == 2 and line.startswith("opsd-eval: error: --model: 'no-such-org/NoSuchModel-0B' is not"), line
    assert "HF_HUB_OFFLINE" in line and not out.exists()


def test_eval_prompt_longer_than_max_model_len_and_cut_answers(tiny_qwen3_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", str(tiny_qwen3_dir), "--benchmark", BENCH, "--out-dir", str(out), "--no-thinking"]
    rc = eval_main([*base, "--max-model-len", "8"])
    line = _one_line(capsys)
    assert rc == 2 and line.startswith("opsd-eval: error: --max-model-len: eval_tiny problem "), line
    assert "-token prompt, longer than --max-model-len 8." in line
    rc = eval_main([*base, "--max-model-len", "400", "--max-new-tokens", "399"])
    line = _one_line(capsys)
    assert rc == 2 and line.startswith("opsd-eval: error: --max-new-tokens 399 + the longest prompt ("), line
    assert "answers would be cut" in line and "--max-model-len 400" in line
    assert not out.exists()  # no run_config.json, nothing


def test_convert_out_checked_before_the_model_loads(tiny_qwen3_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc = convert_cli.main(
        ["hf-to-megatron", "--hf", str(tiny_qwen3_dir), "--out", str(tmp_path / "f" / "ckpt")]
    )
    line = _one_line(capsys)
    assert rc == 2 and line.startswith("opsd-convert hf-to-megatron: error: --out: "), line


def test_ema_teacher_with_lora_says_what_it_tracks(tiny_qwen3_dir, tmp_path, caplog, monkeypatch):
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.preflight import preflight

    monkeypatch.delenv("RANK", raising=False)
    raw = {
        "output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_qwen3_dir), "dtype": "float32"},
        "data": {"path": "builtin:tiny_math"}, "prompts": {"max_prompt_tokens": 768},
        "rollout": {"max_new_tokens": 12},
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2},
        "lora": {"enabled": True, "rank": 4, "alpha": 8.0}, "teacher": {"mode": "ema", "ema_decay": 0.99},
    }  # fmt: skip
    with caplog.at_level("INFO", logger="opsd_megatron"):
        preflight(config_from_dict(raw), world_size=1)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher.mode=ema with LoRA")]
    assert len(said) == 1 and "decay 0.99" in said[0] and "LoRA-merged weights" in said[0], said
    caplog.clear()
    raw["teacher"] = {"mode": "frozen"}
    with caplog.at_level("INFO", logger="opsd_megatron"):
        preflight(config_from_dict(raw), world_size=1)
    assert not [r for r in caplog.records if "teacher.mode" in r.getMessage()]
