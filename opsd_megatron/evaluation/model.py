"""Resolve `--model` to a Hugging Face directory: used as is, or exported from a Megatron checkpoint.

    hf_dir = resolve_model_dir("ckpt/qwen3_tp2pp2", work_dir="runs/eval/x")   # -> runs/eval/x/hf_export

* An HF directory (has `config.json`) or a hub name is returned unchanged.
* A Megatron checkpoint written by `opsd-convert hf-to-megatron` / `save_megatron_checkpoint` (has
  `opsd_meta.json`, any TP x PP) is exported on the fly to `work_dir/hf_export` by running
  `python -m opsd_megatron.cli.convert megatron-to-hf` in a child process (one rank, its own torch.distributed
  world, so the evaluator's process and its vLLM engine stay clean). The export is reused on a resumed run
  as long as the checkpoint's metadata file is unchanged.
* A training run's checkpoint (`RUN`, `RUN/checkpoints` or one `RUN/checkpoints/step_*`; the newest
  complete step when not named) is exported the same way (the model rebuilt from the config saved with it,
  LoRA adapters merged), so any step of a run, e.g. the best one, can be evaluated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from opsd_megatron.run.preflight import looks_like_hub_name
from opsd_megatron.run.training_checkpoint import (
    is_training_checkpoint,
    resolve_training_checkpoint,
)

logger = logging.getLogger(__name__)

META_FILE = "opsd_meta.json"  # written next to every opsd_megatron Megatron checkpoint
EXPORT_MARK = ".opsd_export_source.json"
_DIST_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
)  # fmt: skip


def is_hf_dir(path: Path) -> bool:
    """A directory with a `config.json` (weights may be safetensors or bin)."""
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model_dir(model: str, work_dir: str | Path) -> str:
    """The HF directory (or hub name) to load for `model`; Megatron checkpoints are exported first."""
    path = Path(model).expanduser()
    if is_hf_dir(path):
        return str(path)
    if path.is_dir() and not (path / META_FILE).is_file() and is_training_checkpoint(path):
        step = resolve_training_checkpoint(path, arg="--model")
        return str(_export_megatron(step, Path(work_dir) / "hf_export", stamp="opsd_state.json"))
    if (path / META_FILE).is_file():
        return str(_export_megatron(path, Path(work_dir) / "hf_export"))
    if path.exists() or not looks_like_hub_name(model):
        raise ValueError(
            f"--model {model!r} is neither a Hugging Face directory (no config.json) nor a Megatron "
            f"checkpoint (no {META_FILE}, no latest/step_* checkpoints)."
        )
    return model  # a hub name: vLLM / transformers resolve it


def _export_megatron(ckpt: Path, out: Path, stamp: str = META_FILE) -> Path:
    """Export `ckpt` to `out` with `opsd-convert megatron-to-hf` in a child process (reused when current)."""
    source = {"checkpoint": str(ckpt.resolve()), "meta_mtime": (ckpt / stamp).stat().st_mtime}
    mark = out / EXPORT_MARK
    if mark.is_file() and json.loads(mark.read_text()) == source and is_hf_dir(out):
        logger.info("reusing the HF export of %s in %s", ckpt, out)
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    cmd = [sys.executable, "-m", "opsd_megatron.cli.convert", "megatron-to-hf", "--megatron", str(ckpt)]
    cmd += ["--out", str(tmp)]
    logger.info("exporting Megatron checkpoint %s to HF: %s", ckpt, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not is_hf_dir(tmp):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"exporting Megatron checkpoint {str(ckpt)!r} to HF failed:\n{tail}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    mark.write_text(json.dumps(source))
    return out


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json", "config.json")


def model_fingerprint(model: str) -> str:
    """A short hash of what `model` holds: for a directory the names, sizes and mtimes of its weight, index
    and config files (changed weights give a new hash); for a hub name the name itself."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{model}"
    h = hashlib.sha256()
    files = sorted({p for pat in _WEIGHT_PATTERNS for p in path.glob(pat) if p.is_file()})
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
