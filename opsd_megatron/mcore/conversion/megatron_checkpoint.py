"""Megatron distributed checkpoints (`megatron.core.dist_checkpointing`), reshardable across TP x PP.

    save_megatron_checkpoint(chunks, ckpt_dir, extra_sharded_state={"optimizer": opt_sd})   # collective
    meta = read_checkpoint_metadata(ckpt_dir)       # arch, hf_config, tp, pp, dtype, padded vocab
    chunks = build_model(meta["hf_config"], padded_vocab_size=meta["padded_vocab_size"])
    extra = load_megatron_checkpoint(chunks, ckpt_dir, extra_sharded_state={"optimizer": opt_sd})

A checkpoint saved at TP2 x PP1 loads at TP1 x PP2 (dist_checkpointing reshards). Next to Megatron's
files we write `opsd_meta.json`, so that loading into a model of another architecture or shape, a different
padded vocabulary, or (with strict_layout=True) another TP/PP fails with one clear sentence.
Trainers add optimizer / scheduler / RNG state through `extra_sharded_state` (any sharded or plain state
under keys other than "model*"); `model_sharded_state_dict(chunks)` is the model part on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from opsd_megatron.mcore.models.builder import model_info, unwrap

META_FILE = "opsd_meta.json"
FORMAT_VERSION = 1
_SHAPE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "ffn_hidden_size",
    "vocab_size",
    "num_experts",
    "moe_ffn_hidden_size",
)


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def model_sharded_state_dict(model_chunks: list) -> dict:
    """{"model": sd} (or "model0", "model1", ... for virtual-pipeline chunks) of ShardedTensors."""
    n = len(model_chunks)
    return {_model_key(i, n): unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def checkpoint_metadata(model_chunks: list) -> dict:
    info = model_info(model_chunks)
    return {
        "format_version": FORMAT_VERSION,
        "architecture": info.spec.architecture,
        "spec": info.spec.to_dict(),
        "hf_config": info.hf_config,
        "tp": info.tp,
        "pp": info.pp,
        "ep": info.ep,
        "dtype": str(info.dtype).replace("torch.", ""),
        "padded_vocab_size": info.padded_vocab_size,
    }


def read_checkpoint_metadata(ckpt_dir: str | Path) -> dict:
    """The `opsd_meta.json` of a checkpoint written by save_megatron_checkpoint."""
    p = Path(ckpt_dir) / META_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir} is not an opsd_megatron Megatron checkpoint: {META_FILE} is missing "
            f"(write it with opsd-convert hf-to-megatron or save_megatron_checkpoint)."
        )
    return json.loads(p.read_text())


def save_megatron_checkpoint(
    model_chunks: list,
    ckpt_dir: str | Path,
    *,
    extra_sharded_state: dict | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Save model (+ extra sharded state) as a dist checkpoint and write metadata. Collective (all ranks)."""

    ckpt_dir = Path(ckpt_dir)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    state = model_sharded_state_dict(model_chunks)
    if extra_sharded_state:
        clash = [k for k in extra_sharded_state if k.startswith("model")]
        if clash:
            raise ValueError(f"extra_sharded_state keys {clash} clash with the model keys ('model*').")
        state.update(extra_sharded_state)
    dist_checkpointing.save(state, str(ckpt_dir))
    if rank0:
        meta = checkpoint_metadata(model_chunks)
        meta.update(extra_metadata or {})
        (ckpt_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir


def check_compatible(meta: dict, model_chunks: list, ckpt_dir, *, strict_layout: bool = False) -> None:
    """Raise ValueError (one sentence) if the checkpoint cannot be loaded into these chunks."""
    info = model_info(model_chunks)
    if meta.get("architecture") != info.spec.architecture:
        raise ValueError(
            f"Megatron checkpoint {ckpt_dir} holds architecture {meta.get('architecture')!r}, but the model "
            f"is {info.spec.architecture!r}."
        )
    saved = meta.get("spec", {})
    for f in _SHAPE_FIELDS:
        if f in saved and saved[f] != getattr(info.spec, f):
            raise ValueError(
                f"Megatron checkpoint {ckpt_dir} has {f}={saved[f]}, but the model has "
                f"{f}={getattr(info.spec, f)}."
            )
    if meta.get("padded_vocab_size") != info.padded_vocab_size:
        raise ValueError(
            f"Megatron checkpoint {ckpt_dir} has padded vocab {meta.get('padded_vocab_size')}, the model "
            f"{info.padded_vocab_size}: build it with build_model(..., padded_vocab_size="
            f"{meta.get('padded_vocab_size')})."
        )
    if strict_layout and (meta.get("tp"), meta.get("pp")) != (info.tp, info.pp):
        raise ValueError(
            f"Megatron checkpoint {ckpt_dir} was saved at TP={meta.get('tp')} x PP={meta.get('pp')}, but "
            f"TP={info.tp} x PP={info.pp} was requested (allow resharding to load it anyway)."
        )


def load_megatron_checkpoint(
    model_chunks: list,
    ckpt_dir: str | Path,
    *,
    extra_sharded_state: dict | None = None,
    strict_layout: bool = False,
) -> dict:
    """Load a dist checkpoint into `model_chunks` (resharding as needed). Collective (all ranks).

    Returns the loaded entries of `extra_sharded_state` (e.g. {"optimizer": ...}); the model is loaded
    in place. Raises ValueError if the checkpoint's metadata does not match the model.
    """

    meta = read_checkpoint_metadata(ckpt_dir)
    check_compatible(meta, model_chunks, ckpt_dir, strict_layout=strict_layout)
    state = model_sharded_state_dict(model_chunks)
    if extra_sharded_state:
        state.update(extra_sharded_state)
    loaded = dist_checkpointing.load(state, str(ckpt_dir))
    n = len(model_chunks)
    for i, chunk in enumerate(model_chunks):
        result = unwrap(chunk).load_state_dict(loaded[_model_key(i, n)], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise ValueError(f"Megatron checkpoint {ckpt_dir} lacks model tensors {missing[:5]}.")
    return {k: v for k, v in loaded.items() if not k.startswith("model")}


def default_dtype(meta: dict) -> torch.dtype:
    return getattr(torch, meta.get("dtype", "float32"))
