"""`opsd-convert`: Hugging Face <-> Megatron distributed checkpoints, and a logits check between them.

    opsd-convert hf-to-megatron --hf HF_DIR --out CKPT_DIR --tp 2 --pp 2     (run under torchrun, 4 ranks)
    opsd-convert megatron-to-hf --megatron CKPT_DIR --out HF_OUT
    opsd-convert verify --hf HF_DIR --megatron CKPT_DIR --tp 1 --pp 2        (torchrun, 2 ranks)
    opsd-convert hf-to-megatron ... --pp 2 --pipeline-layers 2,1             (uneven split of 3 layers)
    opsd-convert export-lora --megatron RUN/checkpoints/step_000100 --out ADAPTER_DIR   (PEFT adapter)

Every subcommand runs on world size = TP x PP x DP ranks started by torchrun (or srun); a plain
`opsd-convert ...` is one rank (TP = PP = 1). Megatron checkpoints reshard on load: one written at
TP2 x PP2 can be read at any TP x PP that divides the model. `--megatron` also takes a training run's
checkpoint (`RUN/checkpoints/step_000040`, `RUN/checkpoints` or `RUN` for the newest complete one): the
model is rebuilt from the config saved with it, LoRA adapters merged. User errors (a missing path, a layout
that does not fit the world) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
multi-rank runs go through torchrun (world size = TP x PP x DP), e.g.
  torchrun --nproc-per-node 4 -m opsd_megatron.cli.convert hf-to-megatron --hf Qwen3-1.7B --out ckpt --tp 2
  --pp 2
  torchrun --nproc-per-node 2 -m opsd_megatron.cli.convert verify --hf Qwen3-1.7B --megatron ckpt --tp 1 --pp
  2
Without torchrun the tool runs as a single rank (TP = PP = 1)."""

TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 2e-2), "float16": (2e-2, 1e-2)}  # (atol, rtol)


def _dtype(name: str):
    import torch

    return {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }[name]


def _layer_counts(text: str) -> list[int]:
    """`--pipeline-layers 2,1` -> [2, 1]."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts per stage, e.g. 2,1; got {text!r}"
        ) from None


def _pipeline_layers(args, num_layers: int | None) -> list[int] | None:
    """args.pipeline_layers checked against --pp and the model's layer count (ValueError naming the flag)."""
    from opsd_megatron.mcore import parallel

    pl = getattr(args, "pipeline_layers", None)
    try:
        parallel.check_pipeline_layers(pl, args.pp, num_layers)
    except ValueError as e:
        raise ValueError(f"--pipeline-layers: {e}") from None
    return pl


def _hf_layers(hf_dir: str) -> int | None:
    import json

    cfg = Path(hf_dir) / "config.json"
    return json.loads(cfg.read_text()).get("num_hidden_layers") if cfg.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="opsd-convert",
        description="Convert between Hugging Face checkpoints and Megatron distributed checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="show third-party (Megatron) messages")
    sub = ap.add_subparsers(dest="command", required=True)
    common = dict(formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)

    def layout(p, default_dtype="fp32"):
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
        p.add_argument("--ep", type=int, default=1, help="expert-parallel size, MoE models (default 1)")
        p.add_argument(
            "--pipeline-layers",
            type=_layer_counts,
            default=None,
            help="decoder layers per pipeline stage for an uneven split, e.g. 2,1 (default: even)",
        )
        p.add_argument("--dtype", default=default_dtype, choices=["fp32", "bf16"], help="model dtype")

    p = sub.add_parser("hf-to-megatron", help="HF dir -> Megatron distributed checkpoint", **common)
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    layout(p)
    p = sub.add_parser("megatron-to-hf", help="Megatron distributed checkpoint -> HF dir", **common)
    p.add_argument(
        "--megatron", required=True,
        help="Megatron checkpoint (hf-to-megatron) or a training run's checkpoint (RUN/checkpoints/step_*)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir (default: the one stored in the checkpoint)"
    )
    layout(p, default_dtype=None)
    p = sub.add_parser("verify", help="compare Megatron vs transformers logits on a few inputs", **common)
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument(
        "--megatron", default=None, help="Megatron checkpoint (default: load the HF weights directly)"
    )
    p.add_argument("--num-inputs", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=None, help="absolute tolerance (default: by dtype)")
    layout(p)
    from opsd_megatron.cli import export_lora

    export_lora.add_parser(sub, **common)
    return ap


def _rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def hf_to_megatron(args) -> int:
    import shutil

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights, save_megatron_checkpoint
    from opsd_megatron.mcore.conversion.hf_checkpoint import TOKENIZER_FILES
    from opsd_megatron.mcore.models import build_model

    pl = _pipeline_layers(args, _hf_layers(args.hf))
    parallel.initialize(args.tp, args.pp, ep=args.ep, pipeline_layers=pl)
    _progress(f"reading HF checkpoint {args.hf} (TP={args.tp} x PP={args.pp} x EP={args.ep})")
    chunks = build_model(args.hf, dtype=_dtype(args.dtype), perform_initialization=False)
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
                shutil.copy(Path(args.hf) / f, tok / f)
        print(f"wrote Megatron checkpoint {out} (TP={args.tp} x PP={args.pp}, {args.dtype})")
    return 0


def _load_megatron(ckpt: str, tp: int, pp: int, dtype_name: str | None, ep: int = 1, args=None):
    """(chunks, meta, shard_hook, tokenizer dir) of an opsd_megatron Megatron or training checkpoint."""
    from opsd_megatron.mcore.conversion.megatron_checkpoint import META_FILE
    from opsd_megatron.mcore.conversion.training_checkpoint import (
        is_training_checkpoint,
        load_training_model,
        resolve_training_checkpoint,
        training_config,
        training_shard_hook,
    )

    if not (Path(ckpt) / META_FILE).is_file() and is_training_checkpoint(ckpt):
        step = resolve_training_checkpoint(ckpt)
        pl = _pipeline_layers(args, _hf_layers(training_config(step).model.path)) if args else None
        _progress(f"reading training checkpoint {step} (TP={tp} x PP={pp})")
        dtype = _dtype(dtype_name) if dtype_name else None
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
    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_megatron_checkpoint, read_checkpoint_metadata
    from opsd_megatron.mcore.conversion.megatron_checkpoint import default_dtype
    from opsd_megatron.mcore.models import build_model

    meta = read_checkpoint_metadata(ckpt)
    pl = _pipeline_layers(args, meta.get("hf_config", {}).get("num_hidden_layers")) if args else None
    parallel.initialize(tp, pp, ep=ep, pipeline_layers=pl)
    dtype = _dtype(dtype_name) if dtype_name else default_dtype(meta)
    chunks = build_model(
        meta["hf_config"],
        dtype=dtype,
        padded_vocab_size=meta["padded_vocab_size"],
        perform_initialization=False,
    )
    load_megatron_checkpoint(chunks, ckpt)
    return chunks, meta


def megatron_to_hf(args) -> int:
    from opsd_megatron.mcore.conversion import save_hf_checkpoint

    chunks, _, hook, default_tok = _load_megatron(args.megatron, args.tp, args.pp, args.dtype, args.ep, args)
    tok = args.tokenizer or default_tok
    _progress(f"writing HF checkpoint to {args.out}" + (" (LoRA merged)" if hook else ""))
    out = save_hf_checkpoint(chunks, args.out, tokenizer_dir=tok, shard_hook=hook)
    if _rank0():
        print(f"wrote HF checkpoint {out}")
    return 0


def verify(args) -> int:
    """Megatron logits (TP x PP) vs transformers logits; prints max |diff| and PASS/FAIL on the last stage."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models import build_model, forward_logits, model_info

    dtype = _dtype(args.dtype)
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
        from transformers import AutoModelForCausalLM

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


def check_args(args) -> None:
    """User errors before anything heavy: sizes, the layout against the world, paths that must exist."""
    import os

    for flag in ("tp", "pp"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world % (args.tp * args.pp):
        raise ValueError(
            f"--tp x --pp = {args.tp} x {args.pp} = {args.tp * args.pp} does not divide the {world} "
            "process(es) started (torchrun --nproc-per-node N; a plain run is one process)."
        )
    hf = getattr(args, "hf", None)
    if hf is not None and not (Path(hf) / "config.json").is_file():
        raise ValueError(f"--hf {hf!r} is not a Hugging Face model directory (no config.json).")
    mg = getattr(args, "megatron", None)
    if mg is not None and not Path(mg).is_dir():
        raise ValueError(f"--megatron {mg!r} does not exist.")
    if args.command == "megatron-to-hf":
        from opsd_megatron.mcore.conversion.hf_checkpoint import check_export_dir

        check_export_dir(Path(args.out))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from opsd_megatron.cli import export_lora
    from opsd_megatron.config import ConfigError
    from opsd_megatron.observe.console import setup_logging

    setup_logging("info", verbose=args.verbose)
    handler = {
        "hf-to-megatron": hf_to_megatron,
        "megatron-to-hf": megatron_to_hf,
        "verify": verify,
        "export-lora": export_lora.run,
    }[args.command]
    try:
        check_args(args)
        return handler(args)
    except (ValueError, ConfigError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"opsd-convert {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
