"""`opsd-train CONFIG.yaml [key.sub=value ...]`: run On-Policy Self-Distillation on Megatron-core.

One process per GPU (or per CPU "device"), started by torchrun or srun:

    torchrun --nproc-per-node 2 -m opsd_megatron.train examples/tiny_cpu_demo.yaml train.steps=5
    srun --ntasks-per-node 8 opsd-train examples/qwen3_1.7b_opsd.yaml parallel.tp=2

`output_dir` (from the config) receives checkpoints/, metrics.jsonl, tensorboard/, config.yaml and hf/
(the final Hugging Face export). A run resumes from the latest complete checkpoint there unless
`checkpoint.resume=false`.
SIGTERM / SIGUSR1 (SLURM preemption) finish the current step, save a checkpoint and exit 0.
`algorithm: sft` in the config runs supervised fine-tuning on the reference solutions instead
(`opsd_megatron.sft`: same data, prompts, checkpoints, metrics and export).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO dumps whole configs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="opsd-train", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML config (see examples/)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied in order")
    args = ap.parse_args(argv)
    _setup_logging()
    from opsd_megatron.config import ConfigError, load_config
    from opsd_megatron.data import DataError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"opsd-train: {e}", file=sys.stderr)
        return 2
    from opsd_megatron.sft import make_trainer

    try:
        trainer = make_trainer(cfg)  # OPSDTrainer, or SFTTrainer for algorithm: sft
    except (ConfigError, DataError) as e:
        print(f"opsd-train: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
