"""The `opsd-convert` subcommands that load models: `hf-to-megatron`, `megatron-to-hf`, `verify` (see
`opsd_megatron.cli.convert` for the command line; `export-lora` is `cli/export_lora.py`).

    rc = hf_to_megatron(args)    # args: the parsed and checked `opsd-convert hf-to-megatron` namespace

Every function runs on all ranks started by torchrun (world = TP x PP x DP); collectives are those of
`parallel.initialize`, the checkpoint load/save and, in `verify`, one all-reduce MIN of the pass flag.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mps

from opsd_megatron.mcore import parallel
from opsd_megatron.mcore.conversion import (
    load_hf_weights,
    load_megatron_checkpoint,
    read_checkpoint_metadata,
    save_hf_checkpoint,
    save_megatron_checkpoint,
)
from opsd_megatron.mcore.conversion.hf_checkpoint import TOKENIZER_FILES, check_export_dir
from opsd_megatron.mcore.conversion.megatron_checkpoint import META_FILE, default_dtype
from opsd_megatron.mcore.dtypes import torch_dtype
from opsd_megatron.mcore.layout import LayoutError, check_pipeline_layers
from opsd_megatron.mcore.models import build_model, forward_logits, model_info
from opsd_megatron.run.training_checkpoint import (
    is_training_checkpoint,
    load_training_model,
    resolve_training_checkpoint,
    training_config,
    training_shard_hook,
)

TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 2e-2), "float16": (2e-2, 1e-2)}  # (atol, rtol)


def _pipeline_layers(args, num_layers: int | None) -> list[int] | None:
    """args.pipeline_layers checked against --pp and the model's layer count (ValueError naming the flag)."""
    pl = getattr(args, "pipeline_layers", None)
    try:
        check_pipeline_layers(pl, args.pp, num_layers, pp_key="--pp")
    except LayoutError as e:
        raise ValueError(f"--pipeline-layers: pipeline_layers {e.problem}") from None
    return pl


def _hf_layers(hf_dir: str) -> int | None:
    cfg = Path(hf_dir) / "config.json"
    return json.loads(cfg.read_text()).get("num_hidden_layers") if cfg.is_file() else None


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def hf_to_megatron(args) -> int:
    pl = _pipeline_layers(args, _hf_layers(args.hf))
    parallel.initialize(args.tp, args.pp, ep=args.ep, pipeline_layers=pl)
    _progress(f"reading HF checkpoint {args.hf} (TP={args.tp} x PP={args.pp} x EP={args.ep})")
    chunks = build_model(args.hf, dtype=torch_dtype(args.dtype), perform_initialization=False)
    load_hf_weights(chunks, args.hf)
    _progress(f"writing Megatron checkpoint to {args.out}")
    out = save_megatron_checkpoint(
        chunks, args.out, extra_metadata={"source_hf_dir": str(Path(args.hf).resolve())}
    )
    if _rank0():
        tok = out / "tokenizer"
        tok.mkdir(exist_ok=True)
        for f in TOKENIZER_FILES:
            if (Path(args.hf) / f).is_file():
                shutil.copyfile(Path(args.hf) / f, tok / f)
        print(f"wrote Megatron checkpoint {out} (TP={args.tp} x PP={args.pp}, {args.dtype})")
    return 0


def _load_megatron(ckpt: str, tp: int, pp: int, dtype_name: str | None, ep: int = 1, args=None):
    """(chunks, meta, shard_hook, tokenizer dir) of an opsd_megatron Megatron or training checkpoint."""
    if not (Path(ckpt) / META_FILE).is_file() and is_training_checkpoint(ckpt):
        step = resolve_training_checkpoint(ckpt)
        pl = _pipeline_layers(args, _hf_layers(training_config(step).model.path)) if args else None
        _progress(f"reading training checkpoint {step} (TP={tp} x PP={pp})")
        dtype = torch_dtype(dtype_name) if dtype_name else None
        chunks, cfg = load_training_model(step, tp, pp, dtype, ep=ep, pipeline_layers=pl)
        return chunks, {}, training_shard_hook(cfg), cfg.model.tokenizer or cfg.model.path
    if not (Path(ckpt) / META_FILE).is_file():
        raise ValueError(
            f"--megatron {ckpt!r} is neither an opsd-convert checkpoint (no {META_FILE}) nor a training "
            "checkpoint (no opsd_state.json, step_* or checkpoints/)."
        )
    _progress(f"reading Megatron checkpoint {ckpt} (TP={tp} x PP={pp})")
    chunks, meta = _load_converted(ckpt, tp, pp, dtype_name, ep, args)
    return chunks, meta, None, Path(ckpt) / "tokenizer"


def _progress(msg: str) -> None:
    if _rank0():
        print(f"opsd-convert: {msg}", file=sys.stderr, flush=True)


def _load_converted(ckpt: str, tp: int, pp: int, dtype_name: str | None, ep: int = 1, args=None):
    meta = read_checkpoint_metadata(ckpt)
    pl = _pipeline_layers(args, meta.get("hf_config", {}).get("num_hidden_layers")) if args else None
    parallel.initialize(tp, pp, ep=ep, pipeline_layers=pl)
    dtype = torch_dtype(dtype_name) if dtype_name else default_dtype(meta)
    chunks = build_model(
        meta["hf_config"],
        dtype=dtype,
        padded_vocab_size=meta["padded_vocab_size"],
        perform_initialization=False,
    )
    load_megatron_checkpoint(chunks, ckpt)
    return chunks, meta


def megatron_to_hf(args) -> int:
    check_export_dir(Path(args.out))
    chunks, _, hook, default_tok = _load_megatron(args.megatron, args.tp, args.pp, args.dtype, args.ep, args)
    tok = args.tokenizer or default_tok
    _progress(f"writing HF checkpoint to {args.out}" + (" (LoRA merged)" if hook else ""))
    out = save_hf_checkpoint(chunks, args.out, tokenizer_dir=tok, shard_hook=hook)
    if _rank0():
        print(f"wrote HF checkpoint {out}")
    return 0


def verify(args) -> int:
    """Megatron logits (TP x PP) vs transformers logits; prints max |diff| and PASS/FAIL on the last stage."""
    dtype = torch_dtype(args.dtype)
    if args.megatron:
        chunks = _load_megatron(args.megatron, args.tp, args.pp, args.dtype, args.ep, args)[0]
    else:
        pl = _pipeline_layers(args, _hf_layers(args.hf))
        parallel.initialize(args.tp, args.pp, ep=args.ep, pipeline_layers=pl)
        chunks = build_model(args.hf, dtype=dtype, perform_initialization=False)
        load_hf_weights(chunks, args.hf)
    vocab = model_info(chunks).vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, vocab, (args.num_inputs, args.seq_len), generator=gen)
    logits = forward_logits(chunks, input_ids)
    ok = torch.ones(1, dtype=torch.int64)
    reporter = mps.is_pipeline_last_stage() and mps.get_tensor_model_parallel_rank() == 0
    if reporter and mps.get_data_parallel_rank() == 0:
        from transformers import AutoModelForCausalLM  # transformers: only this path needs it

        hf = AutoModelForCausalLM.from_pretrained(args.hf, dtype=dtype).to(logits.device).eval()
        with torch.no_grad():
            ref = hf(input_ids.to(logits.device)).logits.float()
        diff = (logits.float() - ref).abs().max().item()
        atol, rtol = TOLERANCES[str(dtype).replace("torch.", "")]
        tol = args.tol if args.tol is not None else atol + rtol * ref.abs().max().item()
        passed = diff <= tol
        name = Path(args.megatron or args.hf).name
        print(
            f"{name}: max |logit diff| megatron vs transformers = {diff:.3e} (tol {tol:.2e}, {args.dtype}, "
            f"TP={args.tp} PP={args.pp}) {'PASS' if passed else 'FAIL'}"
        )
        ok[0] = int(passed)
    if dist.is_initialized():
        ok = ok.to(parallel.get_state().device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return 0 if bool(ok[0]) else 1
