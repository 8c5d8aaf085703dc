"""The real jobs via sbatch on a local 2-node SLURM cluster (tests/slurm_cluster.py), on the tiny Qwen3 model.

* convert.sbatch: `opsd-convert hf-to-megatron --tp 2` (torchrun, 2 ranks) and eval.sbatch: `opsd-eval` with
  vLLM on a small local benchmark, side by side;
* train.sbatch on 2 emulated nodes x 1 process (TP=2 across the "nodes"): a few OPSD steps, checkpoints, a log
  that shows both node ranks;
* preemption: the same run requeued mid-training with `scontrol requeue` (SIGTERM to the trainer, which saves
  and exits; SLURM restarts the job) resumes from its checkpoint, and its per-step metrics equal the
  uninterrupted run's (wall-time entries excluded).

Run: .venv/bin/python -m pytest tests/test_slurm_jobs.py -q
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from slurm_cluster import CONVERT, EVAL, REPO, TRAIN, job_env

pytestmark = pytest.mark.slurm


STEPS = 3


def _log(path: Path) -> str:
    return path.read_text() if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def side_jobs(slurm_cluster, tiny_qwen3_dir, tmp_path_factory):
    """convert.sbatch and eval.sbatch, submitted once, running beside the training jobs (saves wall time)."""
    d = tmp_path_factory.mktemp("side_jobs")
    conv = slurm_cluster.sbatch(
        [CONVERT, "hf-to-megatron", "--hf", str(tiny_qwen3_dir), "--out", str(d / "megatron"), "--tp", "2"],
        log=d / "convert.log", env=job_env(), cwd=d,
    )  # fmt: skip
    bench = REPO / "tests" / "data" / "eval_tiny.jsonl"
    ev = slurm_cluster.sbatch(
        [EVAL, "--model", str(tiny_qwen3_dir), "--benchmark", str(bench), "--n", "2", "--limit", "2",
         "--max-new-tokens", "16", "--max-model-len", "512", "--gpu-memory-utilization", "0.1",
         "--grader-workers", "1", "--out-dir", str(d / "eval_out")],
        log=d / "eval.log", env=job_env(), cwd=d,
    )  # fmt: skip
    return {"dir": d, "convert": conv, "eval": ev}


def _train_argv(tiny_dir: Path, out: Path) -> list[str]:
    return [
        "-N2", TRAIN, str(REPO / "examples" / "tiny_cpu_demo.yaml"),
        f"output_dir={out}", f"model.path={tiny_dir}", f"train.steps={STEPS}", "checkpoint.save_interval=1",
        "train.global_batch_size=4", "train.micro_batch_size=2", "rollout.max_new_tokens=24",
        "prompts.max_prompt_tokens=960",
        "logging.progress_bar=false", "checkpoint.export_hf=false",
    ]  # fmt: skip


def _rows_by_step(out: Path) -> dict[int, dict]:
    from run_utils import deterministic_view

    from opsd_megatron.observe.metrics import read_metrics

    return {r["step"]: deterministic_view(r) for r in read_metrics(out)}  # later lines win (a resumed run)


def _wait_for_checkpoint(out: Path, job: int, cluster, timeout: float) -> None:
    """Until a complete checkpoint exists (the trainer writes checkpoints/latest last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "checkpoints" / "latest").is_file():
            return
        assert cluster.job_info(job).get("JobState") in ("PENDING", "RUNNING"), (
            "job ended before a checkpoint"
        )
        time.sleep(0.5)
    raise AssertionError(f"no complete checkpoint in {out} after {timeout:.0f} s")


def test_train_two_nodes_and_requeue_resume(slurm_cluster, side_jobs, tiny_qwen3_dir, tmp_path):
    # Both runs at once (same user may share nodes): the uninterrupted reference and the one to requeue.
    env, share = job_env(PROCS_PER_NODE="1"), ["--exclusive=user"]
    ref_out, ref_log = tmp_path / "ref", tmp_path / "ref.log"
    out, log = tmp_path / "requeued", tmp_path / "requeued.log"
    ref = slurm_cluster.sbatch(
        _train_argv(tiny_qwen3_dir, ref_out), log=ref_log, env=env, options=share, cwd=tmp_path
    )
    job = slurm_cluster.sbatch(
        _train_argv(tiny_qwen3_dir, out), log=log, env=env, options=share, cwd=tmp_path
    )

    _wait_for_checkpoint(out, job, slurm_cluster, timeout=300)
    assert len(_rows_by_step(out)) < STEPS, "training finished before the requeue; nothing to resume"
    slurm_cluster.scontrol("requeue", str(job))  # SIGTERM now; restart after ~11 s

    assert slurm_cluster.wait(ref, timeout=420) == "COMPLETED", _log(ref_log)[-6000:]
    text = _log(ref_log)
    assert "node_rank=0 node=n1" in text and "node_rank=1 node=n2" in text, text[-3000:]
    assert "world 2; tp=2 pp=1 dp=1" in text
    ref_rows = _rows_by_step(ref_out)
    assert sorted(ref_rows) == list(range(1, STEPS + 1)), ref_rows.keys()
    assert (ref_out / "checkpoints" / "latest").is_file(), "the uninterrupted run wrote no checkpoint"

    assert slurm_cluster.wait(job, timeout=420) == "COMPLETED", _log(log)[-6000:]
    text = _log(log)
    assert slurm_cluster.job_info(job).get("Restarts") == "1", text[-3000:]
    assert "restart 1:" in text and "checkpoint.resume=true" in text
    assert "resumed from" in text, text[-4000:]
    rows = _rows_by_step(out)
    assert sorted(rows) == sorted(ref_rows)
    for step in ref_rows:
        assert rows[step] == ref_rows[step], (
            f"step {step}: resumed {rows[step]} != uninterrupted {ref_rows[step]}"
        )
    # No lost step: on SIGTERM the trainer saved the step it was in, not only the last interval checkpoint.
    errors = [ln for ln in text.splitlines() if "Error" in ln and not ln.startswith(" ")]
    assert "(signal)" in text, (
        f"the trainer wrote no checkpoint on SIGTERM; errors in the job log: {errors[:6]}"
    )


def test_convert_and_eval_jobs(slurm_cluster, side_jobs):
    d = side_jobs["dir"]
    assert slurm_cluster.wait(side_jobs["convert"], timeout=300) == "COMPLETED", _log(d / "convert.log")
    assert "2 process(es)" in _log(d / "convert.log")
    assert list((d / "megatron").rglob("*.distcp")) or list((d / "megatron").rglob("metadata.json")), (
        f"no Megatron distributed checkpoint in {d / 'megatron'}"
    )
    assert slurm_cluster.wait(side_jobs["eval"], timeout=300) == "COMPLETED", _log(d / "eval.log")
    out = d / "eval_out"
    assert json.loads((out / "summary.json").read_text()), "empty eval summary"
    rows = [json.loads(ln) for ln in (out / "generations.jsonl").read_text().splitlines() if ln.strip()]
    assert len(rows) == 2 * 2, f"expected 2 problems x 2 samples, got {len(rows)} generations"
