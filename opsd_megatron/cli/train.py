"""`opsd-train CONFIG.yaml [key.sub=value ...]`: run On-Policy Self-Distillation on Megatron-core.

One process per GPU (or per CPU "device"), started by opsd-train itself (one node), srun or torchrun:

    opsd-train --nproc-per-node 2 examples/tiny_cpu_demo.yaml train.steps=5
    srun --ntasks-per-node 8 opsd-train examples/qwen3_1.7b_opsd.yaml parallel.tp=2
    torchrun --nproc-per-node 2 -m opsd_megatron.train examples/tiny_cpu_demo.yaml train.steps=5

`output_dir` (from the config) receives checkpoints/, metrics.jsonl, tensorboard/, config.yaml and hf/
(the final Hugging Face export; with LoRA also adapter/, the PEFT adapter). A run resumes from the newest
complete checkpoint there unless `checkpoint.resume=false`.
SIGTERM / SIGUSR1 (SLURM preemption) and Ctrl-C finish the current step, save a checkpoint and exit 0; a
second Ctrl-C exits at once (130). Exit code 2: a configuration, path or data error, one line naming the
key, printed by one rank (`opsd_megatron.run.errors`: rank 0, else the first that has it), with the path of
the per-rank detail log holding the traceback; 1: anything else, also one line. `--nproc-per-node N` runs
torchrun's standalone launch in this process and exits with the ranks' code (2 when any had a usage
error); plain torchrun always exits 1 after a failed rank, with its own report.
`algorithm: sft` in the config runs supervised fine-tuning on the reference solutions instead
(`opsd_megatron.step.sft`: same data, prompts, checkpoints, metrics and export).
`--verbose` (or logging.level=debug) shows vLLM / Megatron / transformers messages, hidden by default.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from opsd_megatron.config import load_config
from opsd_megatron.mcore.layout import env_rank
from opsd_megatron.observe.console import setup_logging
from opsd_megatron.run.checkpoint_index import choose_resume
from opsd_megatron.run.errors import ErrorReport
from opsd_megatron.run.lifeline import follow_launcher


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="opsd-train", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML config (see examples/)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied in order")
    verbose = "show third-party (vLLM, Megatron) logs, tracebacks and the launcher's messages"
    ap.add_argument("-v", "--verbose", action="store_true", help=verbose)
    nproc = "start N ranks on this node (torchrun --standalone in this process; its exit code passes through)"
    ap.add_argument("--nproc-per-node", type=int, default=0, metavar="N", help=nproc)
    return ap


def main(argv: list[str] | None = None) -> int:
    follow_launcher()  # a torchrun rank dies with torchrun's agent (no orphan after a SIGKILLed launcher)
    args = _parser().parse_args(argv)
    if args.nproc_per_node:
        if "TORCHELASTIC_RUN_ID" in os.environ:
            print("opsd-train: --nproc-per-node starts the ranks; drop it under torchrun.", file=sys.stderr)
            return 2
        return launch(args.nproc_per_node, [args.config, *args.overrides, *["--verbose"] * args.verbose],
                      verbose=args.verbose)  # fmt: skip
    report = ErrorReport("opsd-train", verbose=args.verbose)
    try:
        return _train(args, report)
    except BaseException as e:  # one line on one rank (run.errors), the traceback in the detail log
        return report.fail(e)


def _train(args: argparse.Namespace, report: ErrorReport) -> int:
    setup_logging("info", verbose=args.verbose)  # the config's own warning (a clamped warm-up), formatted
    cfg = load_config(args.config, args.overrides)
    report.output_dir = cfg.output_dir
    setup_logging(cfg.logging.level, verbose=args.verbose)
    t0 = time.monotonic()
    try:
        from opsd_megatron.run.engine_server import EngineServer  # heavy (torch, Megatron): after the check
        from opsd_megatron.run.trainer import make_trainer

        trainer = make_trainer(cfg)  # the OPSD or SFT step (cfg.algorithm) in the one loop
        try:
            rows = trainer.train()
            if isinstance(trainer, EngineServer):  # a separate engine rank: nothing to save, end now
                trainer.exit_process()
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


def launcher_exit_code(codes: list[int]) -> int:
    """The launcher's exit code from its ranks' (torchrun's ChildFailedError): 2 when any rank had a usage
    error, else 130 for a Ctrl-C, else the first failure's code (128 + N for a rank ended by signal N)."""
    for wanted in (2, 130):
        if wanted in codes:
            return wanted
    for c in codes:
        if c:
            return c if c > 0 else 128 - c
    return 0


def launch(nproc: int, child_argv: list[str], *, verbose: bool = False) -> int:
    """`opsd-train --nproc-per-node N CONFIG ...`: torchrun's standalone launch of N ranks of
    `opsd_megatron.train` in this process, without torchrun's own report, and its exit code mapped
    (`launcher_exit_code`): under torchrun itself a failed rank always makes the launcher exit 1."""
    # function-local: torch is heavy and only this launch path needs torchrun
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not verbose:
        logging.disable(logging.CRITICAL)  # torchrun's warnings and its "failed (exitcode: 2)" report
    targs = torchrun.parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "opsd_megatron.train", *child_argv]
    )
    try:
        torchrun.run(targs)
    except ChildFailedError as e:
        return launcher_exit_code(
            [f.exitcode for f in sorted(e.failures.values(), key=lambda f: f.timestamp)]
        )
    except SignalException as e:  # SIGTERM / SIGINT to the launcher: torchrun ended the ranks
        return 128 + int(e.sigval)
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
