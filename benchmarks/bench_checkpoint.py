"""Training checkpoints: step time with async vs sync saves, and LoRA checkpoint size lean vs full.

    .venv/bin/python benchmarks/bench_checkpoint.py            # ~200 MB fp32 model (8 x 768), 6 steps
    .venv/bin/python benchmarks/bench_checkpoint.py --smoke    # tiny model, seconds

Step time: the real trainer (`algorithm: sft`, one gloo rank, the task model of `demo.task_model` grown to
`--layers` x `--hidden`) runs `--steps` steps three times: no checkpoint until the last step, a synchronous
checkpoint after every step, and an async one (`checkpoint.async_save`) after every step. Reported: wall time
per step from the end of step 1 to the end of step n-1 (`_timed_run`: the first step's one-time costs and
the final save, synchronous in every mode, are left out), the checkpoint size, and the ratios sync / none
and async / none. On a GPU the async writer shares nothing with the training but the host; on
this 2-core CPU the forked writer competes with the training for the two cores, so the async gain here is a
lower bound.

LoRA size: one lean LoRA checkpoint (adapters + their Adam state + `lora_base.json`) of the same model at
`--lora-rank` vs the model's full weights + the same adapter state (what a LoRA checkpoint held before:
`dist_checkpointing.save` of the whole model's sharded state dict), both written here. Exits 1 on an
exception, when the async run's time per step is not below the sync run's (full mode), or when the lean
LoRA checkpoint is not smaller than 0.5x the full one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def _cfg(
    model: Path, data: Path, out: Path, steps: int, ckpt: dict, lora: dict | None = None, batch: int = 4
) -> dict:
    cfg = {
        "algorithm": "sft",
        "output_dir": str(out),
        "model": {"path": str(model), "dtype": "float32"},
        "parallel": {"tp": 1},
        "data": {"path": str(data)},
        "prompts": {
            "teacher_template": "Problem: {problem}\nReference:\n{solution}\n",
            "max_prompt_tokens": 128,
        },
        "optimizer": {"lr": 1e-4, "clip_grad": 1.0},
        "train": {"steps": steps, "global_batch_size": batch, "micro_batch_size": batch, "seed": 0},
        "checkpoint": {"resume": False, "export_hf": False, **ckpt},
        "logging": {"progress_bar": False},
    }
    if lora:
        cfg["lora"] = lora
    return cfg


def _timed_run(cfg: dict) -> float:
    """Seconds per step from the end of step 1 to the end of step n-1 (each with its save; the first step's
    one-time costs and the final save, synchronous in every mode, are left out)."""
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import Trainer

    ends: dict[int, float] = {}
    trainer = Trainer(
        config_from_dict(cfg), on_step_end=lambda _, step: ends.__setitem__(step, time.perf_counter())
    )
    try:
        trainer.train()
    finally:
        trainer.close()
    n = cfg["train"]["steps"]
    return (ends[n - 1] - ends[1]) / (n - 2) if n > 2 else float("nan")


def _full_lora_size(cfg: dict, out: Path) -> float:
    """MB of what a LoRA checkpoint held before: the whole model's sharded state dict + the optimizer's."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from opsd_megatron.config import config_from_dict
    from opsd_megatron.mcore.models.builder import unwrap
    from opsd_megatron.run.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg))
    try:
        st = trainer.state
        model = unwrap(st.chunks[0]).sharded_state_dict()
        sd = {"model": model, "optimizer": st.optimizer.sharded_state_dict(model)}
        out.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(sd, str(out))
    finally:
        trainer.close()
    return dir_mb(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4, help="problems per step (one micro-batch)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.steps, args.lora_rank = 2, 64, 4, 4
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    from opsd_megatron.demo.synthetic import write_splits
    from opsd_megatron.demo.task_model import make_task_model

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        work = Path(tmp)
        h = args.hidden
        model = make_task_model(work / "model", hidden_size=h, intermediate_size=(8 * h) // 3,
                                num_hidden_layers=args.layers)  # fmt: skip
        model_mb = dir_mb(model)
        data = write_splits(work / "task", "addition", n_train=64, n_heldout=4)["train"]
        n = args.steps
        times = {
            "none": _timed_run(_cfg(model, data, work / "none", n, {"save_interval": 0})),
            "sync": _timed_run(_cfg(model, data, work / "sync", n, {"save_interval": 1})),
            "async": _timed_run(
                _cfg(model, data, work / "async", n, {"save_interval": 1, "async_save": True})
            ),
        }
        ckpt_mb = dir_mb(work / "sync" / "checkpoints" / f"step_{n:06d}")
        lora = {"enabled": True, "rank": args.lora_rank, "alpha": 2.0 * args.lora_rank}
        _timed_run(_cfg(model, data, work / "lora", 1, {"save_interval": 1}, lora))
        lean_mb = dir_mb(work / "lora" / "checkpoints" / "step_000001")
        full_mb = _full_lora_size(_cfg(model, data, work / "lora_full_run", 1, {}, lora), work / "lora_full")
    print(f"model {model_mb:.1f} MB fp32 ({args.layers} x {h}); checkpoint {ckpt_mb:.1f} MB "
          f"(weights + Adam); {n} steps, one save per step; 2-core CPU, one gloo rank")  # fmt: skip
    print(f"{'saves':<8} {'s / step':>9} {'x none':>7}")
    for k, t in times.items():
        print(f"{k:<8} {t:>9.2f} {t / times['none']:>7.2f}")
    print(f"LoRA rank {args.lora_rank}: lean checkpoint {lean_mb:.2f} MB vs full {full_mb:.2f} MB "
          f"(ratio {lean_mb / full_mb:.4f})")  # fmt: skip
    if not args.smoke and times["async"] >= times["sync"]:
        failures.append(
            f"async saves ({times['async']:.2f} s/step) not faster than sync ({times['sync']:.2f})"
        )
    if lean_mb > 0.5 * full_mb:
        failures.append(f"lean LoRA checkpoint {lean_mb:.2f} MB > 0.5x the full one ({full_mb:.2f} MB)")
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
