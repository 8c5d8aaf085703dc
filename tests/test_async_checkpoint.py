"""Async checkpoint save (`checkpoint.async_save`) through the real trainer (SFT on the task model, DP2 over
gloo, real Megatron async writer processes): a run SIGKILLed right after an async save was handed to its
writer (before it could be finalized) resumes from the newest COMPLETE checkpoint with bit-identical metrics;
the unfinished directory is skipped and named; no writer process outlives the killed run. The checkpoint
resumed from was itself an async save (finalized when the next save waited for it)."""

from __future__ import annotations

import os
import signal

import pytest
from dist_utils import run_distributed
from proc_utils import run_marker, wait_gone
from test_sft import _sft_cfg

ENV = {"OMP_NUM_THREADS": "1"}


def run_sft(rank, world_size, cfg_dict, kill_after=None):
    """Worker: train; SIGKILL this rank right after step `kill_after` (its save scheduled, not finalized)."""
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import Trainer

    def on_step_end(trainer, step):
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(config_from_dict(cfg_dict), on_step_end=on_step_end)
    try:
        return {"rows": trainer.train(), "start": trainer.start_step}
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from opsd_megatron.demo.synthetic import write_splits
    from opsd_megatron.demo.task_model import make_task_model

    d = tmp_path_factory.mktemp("async_ckpt")
    model = make_task_model(d / "model", hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    return model, write_splits(d / "task", "addition", n_train=32, n_heldout=4)["train"]


def _cfg(task, out, **ckpt):
    model, data = task
    return _sft_cfg(model, data, out, parallel={"tp": 1}, train={"steps": 4},
                    checkpoint={"resume": True, "async_save": True, **ckpt})  # fmt: skip


def test_async_save_sigkill_mid_write_resumes_bitwise_from_newest_complete(task, tmp_path):
    from run_utils import deterministic_view, read_state

    from opsd_megatron.run.checkpoint_index import choose_resume

    ref = run_distributed(run_sft, 2, _cfg(task, tmp_path / "ref", save_interval=2), timeout=400, env=ENV)
    ref_rows = ref[0]["rows"]
    assert [r["step"] for r in ref_rows] == [1, 2, 3, 4]
    assert read_state(tmp_path / "ref" / "checkpoints" / "step_000002")["reason"] == "interval"  # async one
    assert read_state(tmp_path / "ref" / "checkpoints" / "step_000004")["reason"] == "final"

    out = tmp_path / "run"
    cfg = _cfg(task, out, save_interval=1)
    env = {**ENV, **run_marker()}
    with pytest.raises(AssertionError, match="exited abnormally|failed"):
        run_distributed(run_sft, 2, cfg, 2, timeout=400, env=env)  # killed with step 2's save in flight
    assert wait_gone(env, 30.0) == []  # the forked writers died with their ranks (run.lifeline)
    choice = choose_resume(out / "checkpoints")
    assert choice.path.name == "step_000001"  # step 1's async save was finalized at step 2's poll
    assert [n for n, _ in choice.skipped] == ["step_000002"]
    assert "no opsd_state.json" in choice.skipped[0][1]

    res = run_distributed(run_sft, 2, cfg, timeout=400, env=ENV)[0]
    assert res["start"] == 1
    assert [deterministic_view(r) for r in res["rows"]] == [deterministic_view(r) for r in ref_rows[1:]]
