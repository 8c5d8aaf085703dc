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

from opsd_megatron.config import ConfigError
from opsd_megatron.mcore.layout import env_world_size
from opsd_megatron.observe.console import setup_logging
from opsd_megatron.run.lifeline import follow_launcher
from opsd_megatron.run.preflight import check_writable_dir

EPILOG = """\
multi-rank runs go through torchrun (world size = TP x PP x DP), e.g.
  torchrun --nproc-per-node 4 -m opsd_megatron.cli.convert hf-to-megatron --hf Qwen3-1.7B --out ckpt --tp 2
  --pp 2
  torchrun --nproc-per-node 2 -m opsd_megatron.cli.convert verify --hf Qwen3-1.7B --megatron ckpt --tp 1 --pp
  2
Without torchrun the tool runs as a single rank (TP = PP = 1)."""


def _layer_counts(text: str) -> list[int]:
    """`--pipeline-layers 2,1` -> [2, 1]."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts per stage, e.g. 2,1; got {text!r}"
        ) from None


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

    p = sub.add_parser("export-lora", help="LoRA adapters of a training checkpoint -> PEFT dir", **common)
    p.add_argument("--megatron", required=True, help="training checkpoint directory (step_NNNNNN)")
    p.add_argument("--out", required=True, help="output PEFT adapter directory")
    p.add_argument("--config", default=None, help="the run's config.yaml (default: CKPT/../../config.yaml)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    return ap


def check_args(args) -> None:
    """User errors before anything heavy: sizes, the layout against the world, paths that must exist."""
    for flag in ("tp", "pp"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    world = env_world_size()
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
    if getattr(args, "out", None) is not None:
        check_writable_dir(args.out, "--out")  # before the model loads (minutes at 32B)


def main(argv: list[str] | None = None) -> int:
    """`opsd-convert ...`: parse, check the arguments, run the subcommand; a user error is one line on stderr
    and exit code 2."""
    follow_launcher()  # a torchrun rank dies with torchrun's agent (no orphan after a SIGKILLed launcher)
    args = build_parser().parse_args(argv)
    setup_logging("info", verbose=args.verbose)
    try:
        check_args(args)
        # torch and Megatron load only now, once the arguments are checked: --help and a bad flag answer
        # at once (the subcommands' own modules import them at module level)
        from opsd_megatron.cli import convert_commands, export_lora

        handler = {
            "hf-to-megatron": convert_commands.hf_to_megatron,
            "megatron-to-hf": convert_commands.megatron_to_hf,
            "verify": convert_commands.verify,
            "export-lora": export_lora.run,
        }[args.command]
        return handler(args)
    except (ValueError, ConfigError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"opsd-convert {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
