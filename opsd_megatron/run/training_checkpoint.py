"""Read the model out of a training run's checkpoint (`RUN/checkpoints/step_NNNNNN`), LoRA merged on export.

    step = resolve_training_checkpoint("runs/x")          # a run dir, its checkpoints/ or one step_* dir
    chunks, cfg = load_training_model(step, tp=1, pp=2, pipeline_layers=[3, 1])   # any split, not the run's
    save_hf_checkpoint(chunks, out, tokenizer_dir=..., shard_hook=training_shard_hook(cfg))

A training checkpoint holds model, optimizer, RNG and schedule state but no `opsd_meta.json`; the model is
rebuilt from the config the checkpoint was saved with (`config.yaml` in the step directory, else the run's
`config.yaml`): `model.path`'s `config.json`, LoRA adapters when `lora.enabled`. Only the model tensors are
read (`dist_checkpointing.load` with the model's sharded state dict; the rest of the checkpoint is left);
a LoRA checkpoint with `lora_base.json` holds only the adapters: the base is read from `model.path` after
its content hash was checked against the one recorded at save,
at any TP x PP x EP and pipeline split (dist checkpoints reshard; `opsd-convert --pipeline-layers`).
Collectives: those of `dist_checkpointing.load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from megatron.core import dist_checkpointing

from opsd_megatron.config import config_from_dict
from opsd_megatron.mcore import parallel
from opsd_megatron.mcore.conversion import load_hf_weights
from opsd_megatron.mcore.conversion.megatron_checkpoint import model_sharded_state_dict
from opsd_megatron.mcore.dtypes import torch_dtype
from opsd_megatron.mcore.lora import adapter_sharded_state_dict, apply_lora, lora_shard_hook
from opsd_megatron.mcore.models import build_model
from opsd_megatron.mcore.models.builder import unwrap
from opsd_megatron.run.checkpoint_index import (
    BASE_FILE,
    CONFIG_FILE,
    STATE_FILE,
    CheckpointError,
    base_problem,
    checkpoint_problem,
    choose_resume,
)


def is_training_checkpoint(path: str | Path) -> bool:
    """A step directory (opsd_state.json), a checkpoints root (step_* dirs) or a run dir (checkpoints/)."""
    p = Path(path)
    return (p / STATE_FILE).is_file() or any(p.glob("step_*")) or (p / "checkpoints").is_dir()


def resolve_training_checkpoint(path: str | Path, *, arg: str = "--megatron") -> Path:
    """The verified step directory `path` names: itself, or the newest complete one under it."""
    p = Path(path)
    if (p / STATE_FILE).is_file() or p.name.startswith("step_"):
        problem = checkpoint_problem(p)
        if problem:
            raise CheckpointError(f"{arg} {str(p)!r}: training checkpoint cannot be read: {problem}.")
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    choice = choose_resume(root)
    if choice.path is None:
        why = "; ".join(f"{n}: {w}" for n, w in choice.skipped) or "no step_* directories"
        raise CheckpointError(f"{arg} {str(p)!r}: no complete training checkpoint ({why}).")
    return choice.path


def training_config(step: Path) -> Any:
    """The OPSDConfig the checkpoint was saved with."""
    for f in (step / CONFIG_FILE, step.parent.parent / "config.yaml"):
        if f.is_file():
            return config_from_dict(yaml.safe_load(f.read_text()) or {})
    raise CheckpointError(
        f"training checkpoint {str(step)!r} has no {CONFIG_FILE} (nor {step.parent.parent / 'config.yaml'}), "
        "so its model cannot be rebuilt."
    )


def load_training_model(
    step: Path,
    tp: int = 1,
    pp: int = 1,
    dtype: Any = None,
    ep: int = 1,
    pipeline_layers: list[int] | None = None,
) -> tuple[list, Any]:
    """Model chunks (this rank's TP x PP (x EP) shard) with the checkpoint's weights, and the run's config.

    `pipeline_layers` (decoder layers per stage, `pp` entries; None: even split) is this load's split, which
    need not be the run's: checkpoint tensors are addressed by global layer number."""
    cfg = training_config(step)
    model_dir = Path(cfg.model.path)
    if not (model_dir / "config.json").is_file() and (model_dir.is_absolute() or model_dir.exists()):
        raise CheckpointError(
            f"training checkpoint {str(step)!r}: its model.path {cfg.model.path!r} (needed for the "
            "architecture) has no config.json."
        )
    lean = cfg.lora.enabled and (step / BASE_FILE).is_file()  # adapters only: the base from model.path
    if lean and (problem := base_problem(step, cfg.model.path)) is not None:
        raise CheckpointError(f"training checkpoint {str(step)!r} cannot be read: {problem}.")
    parallel.initialize(tp, pp, ep=ep, pipeline_layers=pipeline_layers)
    chunks = build_model(cfg.model.path, dtype or torch_dtype(cfg.model.dtype), perform_initialization=False)
    if lean:
        load_hf_weights(chunks, cfg.model.path)
    if cfg.lora.enabled:
        apply_lora(chunks, cfg.lora)
    if lean:
        n = len(chunks)
        sd = {
            "model" if n == 1 else f"model{i}": adapter_sharded_state_dict(unwrap(c))
            for i, c in enumerate(chunks)
        }
    else:
        sd = model_sharded_state_dict(chunks)
    state = dist_checkpointing.load(sd, str(step))
    for i, c in enumerate(chunks):
        unwrap(c).load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"], strict=not lean)
    return chunks, cfg


def training_shard_hook(cfg: Any):
    """The export hook that merges LoRA adapters into their base weights (None without LoRA)."""
    if not cfg.lora.enabled:
        return None
    return lora_shard_hook
