"""Build the learning demo's warm start: task data, a random task model, SFT on the Megatron stack.

    python -m opsd_megatron.demo.warmstart runs/warmstart                     # what `make warmstart` runs
    python -m opsd_megatron.demo.warmstart runs/ws --steps 4 --n-train 64     # small scale (the test)
    python -m opsd_megatron.demo.warmstart runs/warmstart --install opsd_megatron/demo/assets/warmstart

Steps: (1) `OUT/task/{train,heldout}.jsonl` from `opsd_megatron.demo.synthetic` (addition, 3-4 digits, seed
0: the demo regenerates the same files); (2) `OUT/init`: the random task model and digit tokenizer
(`opsd_megatron.demo.task_model`); (3) SFT with `opsd-train` and the config `examples/synthetic_sft.yaml`
(`algorithm: sft`, one process) into `OUT/sft`, whose HF export `OUT/sft/hf` is the warm start;
(4) with `--install DIR`, the export's files (weights, config, tokenizer) are copied to DIR, with
`warmstart.json` recording how it was built. The shipped copy is `opsd_megatron/demo/assets/warmstart`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from opsd_megatron.demo.synthetic import write_splits
from opsd_megatron.demo.task_model import make_task_model
from opsd_megatron.observe.metrics import read_metrics

TASK = dict(task="addition", seed=0, min_digits=3, max_digits=4)
"""The demo's task: the demo and `benchmarks/learning.py` regenerate the same splits from it."""
N_TRAIN, N_HELDOUT = 4000, 200
SHIPPED = Path(__file__).with_name("assets") / "warmstart"
"""The warm start shipped with the package (built by `make warmstart`)."""
_EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")  # fmt: skip


def _repo_path(config: str) -> Path:
    """`config` as given, or relative to the repository when run from elsewhere."""
    repo_config = Path(__file__).resolve().parents[2] / config
    return Path(config) if Path(config).is_file() or not repo_config.is_file() else repo_config


def recipe(
    config: str = "examples/synthetic_sft.yaml",
    *,
    steps: int | None = None,
    n_train: int = N_TRAIN,
    overrides: list[str] | None = None,
) -> dict:
    """What defines a warm start: the SFT config (its parsed content's sha256), the steps, the task, the
    overrides. `--install` records it in `warmstart.json`; a test checks the shipped asset against it."""
    data = yaml.safe_load(_repo_path(config).read_text()) or {}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    sft_steps = steps if steps is not None else int(data.get("train", {}).get("steps", 0))
    return {"config": config, "config_sha256": digest, "sft_steps": sft_steps, "task": TASK,
            "n_train": n_train, "overrides": list(overrides or [])}  # fmt: skip


def write_task(out_dir: str | Path, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> dict[str, Path]:
    """The demo task's train/held-out splits in `out_dir` (deterministic)."""
    t = TASK
    return write_splits(out_dir, t["task"], n_train=n_train, n_heldout=n_heldout, seed=t["seed"],
                        min_digits=t["min_digits"], max_digits=t["max_digits"])  # fmt: skip


def install(hf_dir: str | Path, dest: str | Path, meta: dict) -> Path:
    """Copy an HF export's files to `dest` (replacing it) with `warmstart.json` = `meta`."""
    hf_dir, dest = Path(hf_dir), Path(dest)
    missing = [
        f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (hf_dir / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{str(hf_dir)!r} is not a complete HF export (missing {', '.join(missing)})."
        )
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in _EXPORT_FILES:
        if (hf_dir / f).is_file():
            shutil.copy2(hf_dir / f, dest / f)
    (dest / "warmstart.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def build(
    out_dir: str | Path,
    *,
    steps: int | None = None,
    n_train: int = N_TRAIN,
    n_heldout: int = N_HELDOUT,
    config: str = "examples/synthetic_sft.yaml",
    overrides: list[str] | None = None,
) -> Path:
    """Run steps (1)-(3) of the module docstring; returns the warm start's HF directory `OUT/sft/hf`."""
    out = Path(out_dir)
    config = str(_repo_path(config))
    paths = write_task(out / "task", n_train, n_heldout)
    make_task_model(out / "init", seed=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "opsd_megatron.train", config, f"output_dir={out / 'sft'}", f"model.path={out / 'init'}",
           f"data.path={paths['train']}", "checkpoint.resume=false"]  # fmt: skip
    if steps is not None:
        cmd.append(f"train.steps={steps}")
    cmd += list(overrides or [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env)
    return out / "sft" / "hf"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m opsd_megatron.demo.warmstart", description=__doc__.split("\n")[0]
    )
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, help="SFT steps (default: the config's train.steps).")
    ap.add_argument("--n-train", type=int, default=N_TRAIN)
    ap.add_argument("--n-heldout", type=int, default=N_HELDOUT)
    ap.add_argument("--config", default="examples/synthetic_sft.yaml")
    ap.add_argument(
        "--install", metavar="DIR", help="Copy the result here (e.g. opsd_megatron/demo/assets/warmstart)."
    )
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the SFT config")
    a = ap.parse_intermixed_args(argv)  # overrides may follow the options
    try:
        hf = build(a.out_dir, steps=a.steps, n_train=a.n_train, n_heldout=a.n_heldout, config=a.config,
                   overrides=a.overrides)  # fmt: skip
    except subprocess.CalledProcessError as e:
        print(f"warmstart: SFT failed (exit {e.returncode}); see its output above.", file=sys.stderr)
        return 1
    if a.install:
        rows = read_metrics(Path(a.out_dir) / "sft")
        meta = recipe(a.config, steps=a.steps, n_train=a.n_train, overrides=a.overrides)
        if rows[-1]["step"] != meta["sft_steps"]:
            print(
                f"warmstart: SFT stopped at step {rows[-1]['step']}, not {meta['sft_steps']}", file=sys.stderr
            )
            return 1
        meta.update(built_by="python -m opsd_megatron.demo.warmstart " + " ".join(argv or sys.argv[1:]),
                    first_loss=rows[0]["loss"], final_loss=rows[-1]["loss"])  # fmt: skip
        print(f"installed {install(hf, a.install, meta)}")
    print(f"warm start: {hf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
