"""No lost or stale work, file level (no Megatron, no engine): checkpoint verification and the resume choice,
metrics history, W&B id, config changes on resume, start-up path checks, Ctrl-C handling, export
directories, opsd-eval resume keys and argument errors, opsd-convert errors. The run-level checks (a real
tiny run, then resumes from damaged copies of it) are in test_run_safety.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from opsd_megatron.config import ConfigError, config_from_dict
from opsd_megatron.mcore.files import save_safetensors
from opsd_megatron.run.checkpoint_index import (
    CHECKSUMS,
    CheckpointError,
    checkpoint_problem,
    choose_resume,
    file_checksums,
    file_manifest,
    prune_checkpoints,
    verify_checkpoint,
)

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


def _fake_step(root: Path, step: int, *, complete: bool = True, checksums: bool = True) -> Path:
    """A step directory with the files a save leaves (contents are not Megatron's; sizes and checksums are
    checked). `checksums=False`: the opsd_state.json of a version that recorded sizes only."""
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(bytes(range(100)))
    (d / "common.pt").write_bytes(b"c" * 10)
    (d / "metadata.json").write_text("{}")
    if complete:
        state = {"step": step, "reason": "interval", "files": file_manifest(d)}
        if checksums:
            state[CHECKSUMS] = file_checksums(d)
        (d / "opsd_state.json").write_text(json.dumps(state))
    return d


def _flip_bytes(path: Path, at: int, n: int = 4) -> None:
    """Overwrite `n` bytes at offset `at` in place with their complement: same size, other content."""
    with path.open("r+b") as f:
        f.seek(at)
        old = f.read(n)
        f.seek(at)
        f.write(bytes(255 - b for b in old))


def test_resume_picks_newest_complete_checkpoint_and_says_why(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_step(root, 1)
    s2 = _fake_step(root, 2)
    _fake_step(root, 3, complete=False)  # a crash mid-save / a removed opsd_state.json
    (root / "latest").write_text("step_000003")  # the marker is only a hint
    with (s2 / "__0_0.distcp").open("r+b") as f:
        f.truncate(40)  # a truncated shard
    choice = choose_resume(root)
    assert choice.path == root / "step_000001"
    assert [n for n, _ in choice.skipped] == ["step_000003", "step_000002"]
    assert "no opsd_state.json" in choice.skipped[0][1]
    assert "__0_0.distcp has 40 bytes, 100 when it was saved" in choice.skipped[1][1]
    assert "skipped step_000003" in choice.describe()
    (s2 / "__0_0.distcp").unlink()
    assert "__0_0.distcp is missing" in checkpoint_problem(s2)
    with pytest.raises(CheckpointError, match="'checkpoint.load'.*step_000002.*__0_0.distcp is missing"):
        verify_checkpoint(s2)
    assert choose_resume(tmp_path / "none").path is None


def test_changed_bytes_of_the_same_size_are_found_by_checksum_and_old_checkpoints_still_load(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_step(root, 1)
    s2 = _fake_step(root, 2)
    old = _fake_step(root, 3, checksums=False)  # saved before checksums were recorded
    _flip_bytes(s2 / "__0_0.distcp", 50)  # bit rot / an in-place rewrite: the size is unchanged
    _flip_bytes(old / "__0_0.distcp", 50)
    assert (s2 / "__0_0.distcp").stat().st_size == 100
    assert checkpoint_problem(old) is None  # sizes only: still loadable, as before
    assert checkpoint_problem(s2, checksums=False) is None  # sizes alone cannot see it
    why = checkpoint_problem(s2)
    assert why.startswith("file __0_0.distcp has changed since it was saved (CRC-32 "), why
    shutil.rmtree(old)
    choice = choose_resume(root)
    assert choice.path == root / "step_000001"
    assert choice.skipped == [("step_000002", why)]
    with pytest.raises(CheckpointError, match=r"'checkpoint.load'.*step_000002.*__0_0\.distcp has changed"):
        verify_checkpoint(s2)
    _flip_bytes(s2 / "__0_0.distcp", 50)  # flipped back: the recorded checksum matches again
    assert checkpoint_problem(s2) is None
    (s2 / "metadata.json").write_text("{ }")  # every file is covered: a changed size is named first
    assert "metadata.json has 3 bytes, 2 when it was saved" in checkpoint_problem(s2)
    (s2 / "metadata.json").write_text("[]")  # same size, other bytes
    assert checkpoint_problem(s2).startswith("file metadata.json has changed since it was saved")


def test_keep_last_prunes_old_and_broken_checkpoints_never_the_newest_complete(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (1, 3, 4, 5):
        _fake_step(root, step)
    _fake_step(root, 2, complete=False)  # an unfinished save older than the newest complete one
    (root / "step_000004" / "common.pt").write_bytes(b"c")  # a damaged one (size changed)
    newer = _fake_step(root, 7, complete=False)  # newer than the one just saved: left for the run to redo
    with caplog.at_level("INFO", logger="opsd_megatron"):
        removed = prune_checkpoints(root, 2, root / "step_000005")
    assert [p.name for p in removed] == ["step_000004", "step_000002", "step_000001"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000005", "step_000007"]
    assert "checkpoint.keep_last=2: removed step_000004, step_000002, step_000001" in caplog.text
    assert newer.is_dir() and choose_resume(root).path == root / "step_000005"
    assert prune_checkpoints(root, 1, root / "step_000005") == [root / "step_000003"]
    assert prune_checkpoints(root, 1, root / "step_000005") == []
    # The directory passed as the new one is not complete: nothing is removed (the newest complete stays).
    _fake_step(root, 6, complete=False)
    assert prune_checkpoints(root, 1, root / "step_000006") == []
    assert (root / "step_000005" / "opsd_state.json").is_file()
    with pytest.raises(ConfigError, match="'checkpoint.keep_last': must be >= 1"):
        config_from_dict(_tiny_cfg("m", tmp_path / "out", checkpoint={"keep_last": 0}))
    assert config_from_dict(_tiny_cfg("m", tmp_path / "out")).checkpoint.keep_last is None  # keep all


def test_safetensors_files_get_the_umask_mode_not_0600(tmp_path):
    import torch

    old = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(3)}, tmp_path / "a.safetensors", {"format": "pt"})
        os.umask(0o027)
        save_safetensors({"w": torch.zeros(3)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "b.safetensors").stat().st_mode & 0o777) == oct(0o640)


def test_metrics_history_is_replaced_step_by_step_never_truncated(tmp_path):
    from opsd_megatron.observe.metrics import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3)) + '{"st')
    cfg = SimpleNamespace(log_interval=1, wandb_project=None, progress_bar=True)
    m = MetricsLogger(tmp_path, cfg, total_steps=5, start_step=1)  # resumed from step 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # torn tail dropped, history kept
    m.log(2, {"loss": 20.0})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 20.0), (3, 3.0)]
    m.log(3, {"loss": 30.0})
    m.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 20.0),
        (3, 30.0),
        (4, 40.0),
    ]
    line = m.progress_line(4, {"loss": 40.0, "time/step_s": 1.5})
    assert line.startswith("step 4/5 (80%) loss=40 step_s=1.5 eta ")
    m.close()


def test_wandb_run_id_is_stored_and_reused(tmp_path):
    # W&B cannot reach a server here and is not installed: the stored-id logic MetricsLogger passes to
    # wandb.init(id=..., resume="allow") is tested directly.
    from opsd_megatron.observe.metrics import wandb_run_id

    ids = iter(["abc123", "zzz999"])
    first = wandb_run_id(tmp_path, lambda: next(ids))
    again = wandb_run_id(tmp_path, lambda: next(ids))
    assert first == again == "abc123" and (tmp_path / "wandb_run_id").read_text().strip() == "abc123"


def _tiny_cfg(model_dir, out, **extra) -> dict:
    cfg = {
        "output_dir": str(out), "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"path": "builtin:tiny_math"},
        "prompts": {"max_prompt_tokens": 768}, "rollout": {"max_new_tokens": 12},  # the tiny model's 1024
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2},
    }  # fmt: skip
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


def test_config_change_on_resume_is_listed_or_refused(tiny_qwen3_dir, tmp_path, caplog):
    import yaml

    from opsd_megatron.run.preflight import check_config_change, preflight, record_config

    out = tmp_path / "run"
    d = _fake_step(out / "checkpoints", 4)
    saved = config_from_dict(_tiny_cfg(tiny_qwen3_dir, out))
    old = saved.to_dict()
    old["model"].pop("tokenizer")  # saved by an older version without this key: not a change
    (d / "config.yaml").write_text(yaml.safe_dump(old))
    record_config(saved, out)
    # A change a resumed run honours is listed, not silent.
    with caplog.at_level("WARNING", logger="opsd_megatron"):
        assert preflight(config_from_dict(_tiny_cfg(tiny_qwen3_dir, out, optimizer={"lr": 0.5}))) == d
    assert "optimizer.lr: 5e-06 -> 0.5" in caplog.text
    # One it cannot honour is refused, naming the key and the way out.
    changed = _tiny_cfg(tiny_qwen3_dir, out, lora={"enabled": True, "rank": 4}, teacher={"mode": "frozen"})
    with pytest.raises(ConfigError, match="'lora.enabled', 'lora.rank' changed.*allow_config_change=true"):
        preflight(config_from_dict(changed))
    ep = config_from_dict(_tiny_cfg(tiny_qwen3_dir, out, parallel={"ep": 2}))  # chained optimizer at EP > 1
    with pytest.raises(ConfigError, match="'parallel.ep' changed"):
        check_config_change(ep, d)
    tp = config_from_dict(_tiny_cfg(tiny_qwen3_dir, out, parallel={"tp": 2}))  # resharded resume (no RNG)
    assert [k for k, _, _ in check_config_change(tp, d)] == ["parallel.tp"]  # honoured: listed, not refused
    peft = config_from_dict(_tiny_cfg(tiny_qwen3_dir, out, lora={"export_peft": False}))
    assert [k for k, _, _ in check_config_change(peft, d)] == ["lora.export_peft"]  # honoured: not refused
    changed["checkpoint"] = {"allow_config_change": True}
    assert preflight(config_from_dict(changed)) == d
    record_config(config_from_dict(changed), out)
    assert len(list((out / "config_history").glob("*.yaml"))) == 2  # every start's config is kept


def _safetensors(path: Path, n_bytes: int) -> None:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [0, n_bytes]}}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * n_bytes)


def test_startup_path_checks_name_the_key(tiny_qwen3_dir, tmp_path, monkeypatch):
    import shutil

    from opsd_megatron.run.preflight import preflight

    def check(match, **extra):
        with pytest.raises(ConfigError, match=match):
            preflight(config_from_dict(_tiny_cfg(tiny_qwen3_dir, tmp_path / "out", **extra)), world_size=1)

    # a mistyped local path is an immediate error, not a hub lookup
    check(r"'model.path': local path '\./modls/qwen' does not exist", model={"path": "./modls/qwen"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = "nobody/no-such-model"
    check(f"'model.path': '{hub}' is not a local directory and HF_HUB_OFFLINE", model={"path": hub})
    m = tmp_path / "model"
    shutil.copytree(tiny_qwen3_dir, m)
    (m / "chat_template.jinja").unlink()
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    check("'model.path': the tokenizer in .* has no chat template", model={"path": str(m)})
    (m / "tokenizer.json").unlink()
    check("'model.path': .* has no tokenizer files", model={"path": str(m)})
    check("'model.tokenizer': .* has no tokenizer files", model={"tokenizer": str(m)})
    _safetensors(m / "model.safetensors", 64)
    with (m / "model.safetensors").open("r+b") as f:
        f.truncate(f.seek(0, 2) - 10)
    check(r"'model.path': weight file .*model.safetensors is truncated", model={"path": str(m)})
    check(
        "'data.path': local path '/no/such/train.jsonl' does not exist", data={"path": "/no/such/train.jsonl"}
    )
    # the shipped recipe's eval file is checked at start-up, not at step 25
    recipe_eval = {"interval": 25, "path": "data/aime24.jsonl"}
    check("'eval.path': benchmark file 'data/aime24.jsonl' does not exist", eval=recipe_eval)
    (tmp_path / "file").write_text("")
    check("'output_dir': .* is not writable", output_dir=str(tmp_path / "file" / "run"))
    (tmp_path / "out" / "hf").mkdir(parents=True)
    (tmp_path / "out" / "hf" / "notes.txt").write_text("mine")
    check("'checkpoint.export_hf': .*holds 'notes.txt'", checkpoint={"export_hf": True})
    check(r"'parallel.tp' x 'parallel.pp' = 2 x 1 = 2 do not divide the 1 process", parallel={"tp": 2})


def test_train_cli_layout_error_is_one_line_rc2(tiny_qwen3_dir, tmp_path, capsys, monkeypatch):
    from opsd_megatron.cli.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(_tiny_cfg(tiny_qwen3_dir, tmp_path / "out")))
    assert main([str(cfg), "parallel.tp=2", "parallel.pp=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'parallel.tp' x 'parallel.pp' = 2 x 2 = 4 do not divide the 1 process" in err[0]
    import torch.distributed as dist

    assert not dist.is_initialized()  # refused before any process group or model


def test_gpu_memory_utilization_bounded_on_cpu(monkeypatch):
    from opsd_megatron.run.preflight import CPU_KV_CACHE_MAX_GIB, bound_cpu_kv_cache

    with pytest.raises(ConfigError, match="'rollout.gpu_memory_utilization': must be in \\(0, 1\\]"):
        config_from_dict(
            {"model": {"path": "m"}, "data": {"path": "d"}, "rollout": {"gpu_memory_utilization": 1.5}}
        )
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    gib = bound_cpu_kv_cache(0.9, 1)
    assert (
        gib is not None
        and 1 <= gib <= CPU_KV_CACHE_MAX_GIB
        and os.environ["VLLM_CPU_KVCACHE_SPACE"] == str(gib)
    )
    assert bound_cpu_kv_cache(0.9, 1) is None  # a value already set (by the user) wins


_SIGNAL_SCRIPT = """
import os, signal, sys, time
from opsd_megatron.run.signals import StopSignals
stop = StopSignals(grace_s=60).install()
os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C: no KeyboardInterrupt, a stop request
time.sleep(0.1)
os.kill(os.getpid(), signal.SIGINT)      # the same Ctrl-C forwarded by torchrun: ignored
print("stop", stop.signum, flush=True)
time.sleep(1.2)
os.kill(os.getpid(), signal.SIGINT)      # a second Ctrl-C: exit at once
time.sleep(30)
print("not reached", flush=True)
"""


def test_ctrl_c_is_a_stop_request_and_a_second_one_exits_now():
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_SCRIPT], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.stdout.split() == ["stop", str(int(signal.SIGINT))], proc.stdout + proc.stderr
    assert proc.returncode == 130 and "second Ctrl-C" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 25


def test_reexport_replaces_old_shards_and_refuses_foreign_files(tmp_path):
    from opsd_megatron.mcore.conversion.hf_checkpoint import _swap_in, check_export_dir

    out = tmp_path / "hf"
    out.mkdir()
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (out / f).write_bytes(b"old")
    (out / "model.safetensors.index.json").write_text("{}")
    new = tmp_path / ".hf.partial"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"new")
    (new / "config.json").write_text("{}")
    _swap_in(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not any(p.name.startswith(".hf.") for p in tmp_path.iterdir())
    (out / "train.py").write_text("# a user's file")
    with pytest.raises(ValueError, match="holds 'train.py', which an HF export does not write"):
        check_export_dir(out)


def test_convert_errors_are_one_line_rc2(tmp_path, capsys, monkeypatch):
    from opsd_megatron.cli.convert import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cases = [
        (
            ["megatron-to-hf", "--megatron", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
            "--megatron",
        ),
        (["hf-to-megatron", "--hf", str(tmp_path), "--out", str(tmp_path / "o")], "no config.json"),
        (["hf-to-megatron", "--hf", str(tmp_path), "--out", "o", "--tp", "2"], "--tp x --pp = 2 x 1 = 2"),
        (["megatron-to-hf", "--megatron", str(tmp_path), "--out", "o"], "neither an opsd-convert checkpoint"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and err[0].startswith("opsd-convert "), err


def test_eval_argument_errors_name_the_flag_before_start_up(tmp_path, capsys):
    from opsd_megatron.cli.eval import main

    bench = str(DATA / "eval_tiny.jsonl")
    for argv, needle in [
        (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--n", "0"], "--n must be >= 1"),
    ]:
        assert main(["--model", str(tmp_path / "nope"), "--benchmark", bench, *argv]) == 2
        assert needle in capsys.readouterr().err
    assert main(["--model", "m/x", "--benchmark", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--benchmark" in err and "missing.jsonl" in err and "data.path" not in err


def test_eval_model_files_checked_before_start_up(tiny_qwen3_dir, tmp_path, capsys):
    import shutil

    from opsd_megatron.cli.eval import main

    m = tmp_path / "m"
    shutil.copytree(tiny_qwen3_dir, m)
    (m / "tokenizer.json").unlink()
    assert main(["--model", str(m), "--benchmark", str(DATA / "eval_tiny.jsonl")]) == 2
    assert "--model: " in (err := capsys.readouterr().err) and "no tokenizer files" in err
    shutil.copy(Path(tiny_qwen3_dir) / "tokenizer.json", m / "tokenizer.json")
    with (m / "model.safetensors").open("r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    assert main(["--model", str(m), "--benchmark", str(DATA / "eval_tiny.jsonl")]) == 2
    assert "model.safetensors is truncated" in capsys.readouterr().err


class _Engine:
    """A scripted engine: the real runner, grader and files around it, without loading weights."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, sampling, seeds=None):
        from opsd_megatron.rollout.base import RolloutOutput

        self.calls += 1
        return [[RolloutOutput(token_ids=[5, 6], logprobs=[0.0, 0.0], finish_reason="stop")] * sampling.n
                for _ in prompts]  # fmt: skip


def test_eval_resume_is_keyed_on_the_model_files(tiny_qwen3_dir, tmp_path, caplog):
    import shutil

    from transformers import AutoTokenizer

    from opsd_megatron.evaluation.grader import GraderPool
    from opsd_megatron.evaluation.model import model_fingerprint
    from opsd_megatron.evaluation.runner import evaluate
    from opsd_megatron.rollout.base import SamplingConfig

    m = tmp_path / "m"
    shutil.copytree(tiny_qwen3_dir, m)
    tok = AutoTokenizer.from_pretrained(m)
    bench, out = [str(DATA / "eval_tiny.jsonl")], tmp_path / "eval"
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=4)
    with GraderPool(num_workers=1) as pool:
        kw = dict(grader=pool, model_name=str(m))
        evaluate(_Engine(), tok, bench, 1, sampling, out, model_hash=model_fingerprint(str(m)), **kw)
        with caplog.at_level("WARNING"):
            s = evaluate(_Engine(), tok, bench, 1, sampling, out, model_hash=model_fingerprint(str(m)), **kw)
        assert s["num_generated"] == 0 and "resuming: 6 of 6 problems already done" in caplog.text
        time.sleep(0.01)
        (m / "model.safetensors").write_bytes(
            (m / "model.safetensors").read_bytes()
        )  # new weights, same path
        with pytest.raises(ValueError, match="holds results of other weights: the model files changed"):
            evaluate(_Engine(), tok, bench, 1, sampling, out, model_hash=model_fingerprint(str(m)), **kw)
