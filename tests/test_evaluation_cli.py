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


def test_tensor_parallel_size_must_divide_the_ranks(tmp_path, capsys, monkeypatch):
    for k in ("WORLD_SIZE", "SLURM_NTASKS", "RANK"):
        monkeypatch.delenv(k, raising=False)
    rc = main(
        [
            "--model",
            str(tmp_path),
            "--benchmark",
            str(DATA / "eval_tiny.jsonl"),
            "--tensor-parallel-size",
            "2",
        ]
    )
    assert rc == 2
    assert (
        "--tensor-parallel-size 2 does not divide the 1 rank(s): launch under torchrun"
        in capsys.readouterr().err
    )


@pytest.mark.vllm
def test_opsd_eval_under_torchrun_on_two_engines_equals_one(tiny_qwen3_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m opsd_megatron.eval` (two engines of TP 1, chunks of 2 problems) and a
    plain one-process `opsd-eval` (one engine, one chunk) write the same samples and metrics; only rank 0
    prints the table."""
    import json
    import os
    import subprocess
    import sys

    from proc_utils import run_marker, wait_gone

    root = Path(__file__).resolve().parent.parent
    quiet = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env = {**os.environ, **run_marker(), **quiet, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    flags = ["--model", str(tiny_qwen3_dir), "--benchmark", str(DATA / "eval_tiny.jsonl"), "--n", "2",
             "--max-new-tokens", "8", "--seed", "1", "--grader-workers", "1",
             "--max-model-len", "256"]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    runs = {
        "two": [
            *launch,
            "-m",
            "opsd_megatron.eval",
            "--",  # torchrun's parser would take --n for one of its own flags
            *flags,
            "--chunk-size",
            "2",
            "--out-dir",
            str(tmp_path / "two"),
        ],
        "one": [sys.executable, "-m", "opsd_megatron.eval", *flags, "--out-dir", str(tmp_path / "one")],
    }
    out = {}
    try:
        for name, cmd in runs.items():
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            assert p.returncode == 0, p.stderr[-4000:]
            out[name] = p.stdout
    finally:
        assert wait_gone(env, 10) == [], "a rank outlived the launcher"
    assert out["two"].count("summary: ") == 1  # rank 0 prints, rank 1 only generated

    def samples(name):
        lines = (tmp_path / name / "generations.jsonl").read_text().splitlines()
        return sorted((r["key"], r["sample"], r["response"], r["correct"]) for r in map(json.loads, lines))

    assert samples("two") == samples("one") and len(samples("one")) == 12
    summary = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in runs}
    assert summary["two"]["benchmarks"] == summary["one"]["benchmarks"]
