"""Quiet by default: the step line marks checkpoint saves and evaluations, the end-of-run summary has the
held-out accuracy, `logging.progress_bar` draws a tqdm bar on a terminal only, third-party warnings come from
rank 0 only, and the trainer's engine loads without vLLM's progress bar unless --verbose."""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from types import SimpleNamespace

import pytest
from run_utils import deterministic_view

from opsd_megatron.observe.console import setup_logging
from opsd_megatron.observe.metrics import MetricsLogger, run_summary, step_markers

pytestmark = pytest.mark.no_mcore  # never imports megatron: run once (tests/no_mcore.py)

ROW = {"loss": 0.5, "time/step_s": 1.0}


def _logger(tmp_path, progress_bar=True):
    cfg = SimpleNamespace(log_interval=1, wandb_project=None, progress_bar=progress_bar)
    return MetricsLogger(tmp_path, cfg, total_steps=4)


def test_step_line_marks_saves_and_evaluations(tmp_path):
    m = _logger(tmp_path, progress_bar=False)
    assert m.progress_line(1, ROW) == "step 1/4 (25%) loss=0.5 step_s=1"
    saved = {**ROW, "checkpoint/saved": 1.0}
    assert m.progress_line(2, saved) == "step 2/4 (50%) loss=0.5 step_s=1 | checkpoint saved"
    evald = {**saved, "eval/overall/avg@4": 0.3214, "eval/overall/pass@1": 0.3214, "eval/aime/avg@4": 0.1}
    line = m.progress_line(3, evald)
    assert line.endswith("| checkpoint saved | held-out avg@4=0.3214"), line
    assert step_markers({**ROW, "checkpoint/saved": 0.0}) == []
    # which steps saved depends on stop signals: not part of what a resume must reproduce
    assert "checkpoint/saved" not in deterministic_view({"step": 2, **saved})
    m.close()


def test_summary_has_the_held_out_accuracy(tmp_path):
    rows = [{"step": 1, **ROW}, {"step": 2, **ROW, "eval/overall/avg@4": 0.2}, {"step": 4, **ROW}]
    rows.append({"step": 5, **ROW, "eval/overall/avg@4": 0.3125})
    text = run_summary(rows, output_dir=tmp_path, seconds=3, start_step=0, total_steps=5, checkpoint=None,
                       hf_dir=None)  # fmt: skip
    assert (
        "  held-out:   avg@4 0.2 (step 2) -> 0.3125 (step 5)  (eval/ in metrics.jsonl)" in text.splitlines()
    )
    plain = run_summary(rows[:1], output_dir=tmp_path, seconds=3, start_step=0, total_steps=5,
                        checkpoint=None, hf_dir=None)  # fmt: skip
    assert "held-out" not in plain


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_plain_line_elsewhere(tmp_path, monkeypatch, caplog):
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    m = _logger(tmp_path)
    with caplog.at_level(logging.INFO, logger="opsd_megatron"):
        m.log(1, ROW)
        m.log(2, {**ROW, "checkpoint/saved": 1.0})
    m.close()
    drawn = tty.getvalue()
    assert "2/4" in drawn and "|" in drawn and "checkpoint saved" in drawn, drawn
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]  # the bar replaces the line
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: the plain line
    m = _logger(tmp_path / "b")
    with caplog.at_level(logging.INFO, logger="opsd_megatron"):
        m.log(1, ROW)
    m.close()
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1/4 (25%)")]
    assert m.bar is None


def test_third_party_warnings_once_per_job(monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")  # as scripts/demo.sh sets it
    filters = warnings.filters[:]
    try:
        setup_logging("info", rank=1)
        assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("Transformer Engine is not installed", UserWarning, stacklevel=1)
        assert seen == []
        monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
        setup_logging("info", rank=0)
        assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"  # rank 0 keeps the level a user set
    finally:
        warnings.filters[:] = filters
        logging.getLogger("opsd_megatron").setLevel(logging.NOTSET)
