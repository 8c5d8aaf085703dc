"""`opsd-train CONFIG.yaml [key.sub=value ...]`: run On-Policy Self-Distillation on Megatron-core.

One process per GPU (or per CPU "device"), started by torchrun or srun:

    torchrun --nproc-per-node 2 -m opsd_megatron.train examples/tiny_cpu_demo.yaml train.steps=5
    srun --ntasks-per-node 8 opsd-train examples/qwen3_1.7b_opsd.yaml parallel.tp=2

`output_dir` (from the config) receives checkpoints/, metrics.jsonl, tensorboard/, config.yaml and hf/
(the final Hugging Face export; with LoRA also adapter/, the PEFT adapter). A run resumes from the newest
complete checkpoint there unless `checkpoint.resume=false`.
SIGTERM / SIGUSR1 (SLURM preemption) and Ctrl-C finish the current step, save a checkpoint and exit 0; a
second Ctrl-C exits at once (130). Exit code 2: a configuration or path error, one line naming the key.
`algorithm: sft` in the config runs supervised fine-tuning on the reference solutions instead
(`opsd_megatron.step.sft`: same data, prompts, checkpoints, metrics and export).
`--verbose` (or logging.level=debug) shows vLLM / Megatron / transformers messages, hidden by default.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from opsd_megatron.config import ConfigError, load_config
from opsd_megatron.data import DataError
from opsd_megatron.observe.console import env_rank, setup_logging
from opsd_megatron.run.checkpoint_index import choose_resume
from opsd_megatron.run.lifeline import follow_launcher


def main(argv: list[str] | None = None) -> int:
    follow_launcher()  # a torchrun rank dies with torchrun's agent (no orphan after a SIGKILLed launcher)
    ap = argparse.ArgumentParser(prog="opsd-train", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML config (see examples/)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied in order")
    ap.add_argument("-v", "--verbose", action="store_true", help="show third-party (vLLM, Megatron) logs")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"opsd-train: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.logging.level, verbose=args.verbose)
    t0 = time.monotonic()
    try:
        from opsd_megatron.run.trainer import make_trainer  # heavy (torch, Megatron): after the config check

        try:
            trainer = make_trainer(cfg)  # the OPSD or SFT step (cfg.algorithm) in the one loop
        except (ConfigError, DataError) as e:
            print(f"opsd-train: {e}", file=sys.stderr)
            return 2
        try:
            rows = trainer.train()
        finally:
            trainer.close()
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handlers were installed (start-up)
        print(
            f"opsd-train: interrupted during start-up (rank {env_rank()}); nothing to save", file=sys.stderr
        )
        return 130
    if trainer.state.ps.rank == 0:
        print(_summary(trainer, rows, time.monotonic() - t0), flush=True)
    return 0


def _summary(trainer, rows: list[dict], seconds: float) -> str:
    from opsd_megatron.observe.metrics import run_summary  # torch: kept off the config-error path

    cfg = trainer.cfg
    hf = trainer.state.out / "hf"
    sig = trainer.stop_signal
    stopped = None if sig is None else ("Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name)
    return run_summary(
        rows, output_dir=trainer.state.out, seconds=seconds, start_step=trainer.start_step,
        total_steps=cfg.train.steps, checkpoint=choose_resume(trainer.state.ckpt_root, checksums=False).path,
        hf_dir=hf if cfg.checkpoint.export_hf and sig is None and (hf / "config.json").is_file() else None,
        stopped_by=stopped,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
