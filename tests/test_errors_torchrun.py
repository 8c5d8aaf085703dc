"""One error, once, under torchrun (world 2): `opsd-train --nproc-per-node 2` with a bad key (start-up, before
torch.distributed) and with a bad data file (after torch.distributed and the job watchdog started) prints
exactly one line on stderr, exits 2, and names a per-rank detail log that holds the traceback. Plus the
launcher's exit-code mapping and the one-rank line itself (run.errors) without a spawn."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from proc_utils import run_marker, wait_gone
from test_trainer import tiny_config

from opsd_megatron.cli.train import launcher_exit_code
from opsd_megatron.config import ConfigError
from opsd_megatron.run.errors import ErrorReport, detail_path, exit_code

ROOT = Path(__file__).resolve().parent.parent
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
_DETAILS = re.compile(r"\(details: (\S+)\)$")


@pytest.fixture(autouse=True)
def _restore_error_report_state(monkeypatch):
    """An in-process ErrorReport changes module state (the detail logger, ONE_LINE_REPORTS): undo it."""
    from opsd_megatron.run import errors

    monkeypatch.setattr(errors, "ONE_LINE_REPORTS", [False])
    handlers, propagate = errors.details.handlers[:], errors.details.propagate
    yield
    errors.details.handlers[:], errors.details.propagate = handlers, propagate


def _launch(cfg: Path, *overrides: str, tmp: Path) -> tuple[int, list[str]]:
    """`python -m opsd_megatron.cli.train --nproc-per-node 2 CFG ...`: (exit code, stderr lines)."""
    env = {**os.environ, **ENV, **run_marker(), "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "opsd_megatron.cli.train", "--nproc-per-node", "2", str(cfg), *overrides]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    finally:
        assert wait_gone(env, 10) == [], "a rank outlived the launcher"
    return p.returncode, p.stderr.splitlines()


_INFO = re.compile(r"^\d\d:\d\d:\d\d \[rank 0\] INFO opsd_megatron[.\w]*: .{1,200}$")


def _one_line(lines: list[str], needle: str) -> Path:
    """Every stderr line but one is a short INFO line of rank 0 (start-up progress); that one is the error."""
    errors = [ln for ln in lines if not _INFO.match(ln)]
    assert len(errors) == 1, "expected exactly one error line on stderr:\n" + "\n".join(lines)
    line = errors[0]
    assert line.startswith("opsd-train: ") and needle in line, line
    m = _DETAILS.search(line)
    assert m, line
    log = Path(m.group(1))
    assert log.is_file() and "Traceback" in log.read_text(), log
    return log


@pytest.mark.vllm
def test_bad_key_under_torchrun_is_one_line_exit_2_with_a_detail_log(tiny_qwen3_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_qwen3_dir, tmp_path / "run", parallel={"tp": 1})))
    rc, lines = _launch(cfg, "train.stepz=3", tmp=tmp_path)
    assert rc == 2, lines
    log = _one_line(lines, "'train.stepz'")
    assert log.parent.parent == tmp_path  # the config never loaded: a job folder in the temp dir
    assert not (tmp_path / "run").exists()  # nothing created


@pytest.mark.vllm
def test_bad_data_file_under_torchrun_is_one_line_exit_2_with_a_detail_log(tiny_qwen3_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1+1", "solution": "2", "answer": "2"}\n{"problem": oops\n')
    cfg = tmp_path / "cfg.yaml"
    out = tmp_path / "run"
    raw = tiny_config(tiny_qwen3_dir, out, parallel={"tp": 1}, data={"path": str(data)})
    cfg.write_text(yaml.safe_dump(raw))
    rc, lines = _launch(cfg, tmp=tmp_path)
    assert rc == 2, lines
    log = _one_line(lines, "line 2 is not valid JSON")
    assert log.parent == out.absolute() / "logs" and log.name in ("rank0.log", "rank1.log")
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["rank0.log", "rank1.log"]


def test_launcher_exit_code_prefers_a_usage_error():
    assert launcher_exit_code([1, 2]) == 2  # a rank the watchdog ended (1), the one with the bad key (2)
    assert launcher_exit_code([-15, 130]) == 130
    assert launcher_exit_code([-9, 1]) == 137  # the first failure, a signal as 128 + N
    assert launcher_exit_code([]) == 0


def test_one_rank_process_prints_one_line_and_logs_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    report = ErrorReport("opsd-train")
    assert report.fail(ConfigError("config key 'x': bad.")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("opsd-train: config key 'x': bad. (details: "), err
    assert exit_code(RuntimeError("bug")) == 1 and exit_code(KeyboardInterrupt()) == 130
    out = tmp_path / "run"
    assert detail_path(out, 3).parent.parent != out  # output_dir not there yet: not created for a log
    assert not out.exists()
    out.mkdir()
    assert detail_path(out, 3) == out / "logs" / "rank3.log"


def test_non_zero_rank_without_a_store_stays_silent(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    report = ErrorReport("opsd-train", print_wait_s=0.1)
    assert report.fail(ValueError("boom")) == 1
    assert capsys.readouterr().err == ""
    assert "ValueError: boom" in report.log_path().read_text()


def test_rank_0_prints_else_the_first_rank_that_claims(tmp_path, monkeypatch, capsys):
    """Through a real TCPStore: rank 1 prints when rank 0 has not claimed the report within claim_wait_s;
    rank 0, failing later, finds the claim taken and stays silent (it waited for the printed mark)."""
    from datetime import timedelta

    import torch.distributed as dist

    from opsd_megatron.run import errors

    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "7")  # a namespace of its own
    monkeypatch.setattr(errors, "_JOB_STORE", [None])
    monkeypatch.setenv("RANK", "1")
    assert ErrorReport("opsd-train", claim_wait_s=0.3).fail(ConfigError("config key 'x': bad.")) == 2
    assert capsys.readouterr().err.startswith("opsd-train: config key 'x': bad. (details: ")
    assert store.get(errors.report_keys()[0]) == b"1" and store.check([errors.report_keys()[1]])
    monkeypatch.setenv("RANK", "0")
    assert ErrorReport("opsd-train", print_wait_s=5).fail(ConfigError("config key 'x': bad.")) == 2
    assert capsys.readouterr().err == ""
