"""`opsd-convert export-lora --megatron CKPT --out DIR`: the LoRA adapters of a training checkpoint as a
PEFT adapter directory (`adapter_model.safetensors` + `adapter_config.json`, see lora/peft_export.py).

    opsd-convert export-lora --megatron runs/x/checkpoints/step_000100 --out runs/x/adapter_step100
    torchrun --nproc-per-node 2 -m opsd_megatron.cli.convert export-lora --megatron CKPT --out DIR --tp 2

CKPT is a training checkpoint (`step_NNNNNN/` with opsd_state.json) of a run with `lora.enabled`; the run's
config (model path, lora.*) is read from `--config`, by default `<run output_dir>/config.yaml`
(= CKPT/../../config.yaml). Only the adapter tensors are read from the checkpoint (the base weights are not
needed); the checkpoint reshards, so any TP x PP that divides the model works. The command line is parsed in
`opsd_megatron.cli.convert`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron.core import dist_checkpointing

from opsd_megatron.config import load_config
from opsd_megatron.mcore import parallel
from opsd_megatron.mcore.dtypes import torch_dtype
from opsd_megatron.mcore.lora import adapter_sharded_state_dict, apply_lora
from opsd_megatron.mcore.lora.peft_export import save_peft_adapter
from opsd_megatron.mcore.models import build_model
from opsd_megatron.mcore.models.builder import unwrap
from opsd_megatron.run.checkpointing import STATE_FILE


def run(args: argparse.Namespace) -> int:
    """Write the PEFT adapter of `args.megatron` to `args.out` (arguments: `opsd-convert export-lora`)."""
    ckpt = Path(args.megatron)
    if not (ckpt / STATE_FILE).is_file():
        raise SystemExit(
            f"opsd-convert export-lora: {ckpt} is not a complete training checkpoint ({STATE_FILE} missing); "
            "pass a step_NNNNNN directory under <output_dir>/checkpoints."
        )
    cfg_path = Path(args.config) if args.config else ckpt.parent.parent / "config.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"opsd-convert export-lora: run config {cfg_path} not found; pass --config.")
    cfg = load_config(cfg_path)
    if not cfg.lora.enabled:
        raise SystemExit(f"opsd-convert export-lora: {cfg_path} has lora.enabled=false: no adapters.")
    parallel.initialize(args.tp, args.pp)
    chunks = build_model(cfg.model.path, torch_dtype(cfg.model.dtype), perform_initialization=False)
    apply_lora(chunks, cfg.lora)
    n = len(chunks)
    sd = {}
    for i, c in enumerate(chunks):
        sd["model" if n == 1 else f"model{i}"] = adapter_sharded_state_dict(unwrap(c))
    state = dist_checkpointing.load(sd, str(ckpt))
    for i, c in enumerate(chunks):
        unwrap(c).load_state_dict(state["model" if n == 1 else f"model{i}"], strict=False)
    out = save_peft_adapter(chunks, args.out, cfg.lora, base_model=cfg.model.path)
    if parallel.get_state().rank == 0:
        print(f"wrote PEFT adapter {out} from {ckpt}")
    return 0
