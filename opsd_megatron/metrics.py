"""Per-step metrics: `<output_dir>/metrics.jsonl` (one JSON object per optimizer step), TensorBoard always,
W&B when `logging.wandb_project` is set, a tqdm progress bar and a console line on rank 0.

Only rank 0 writes; every rank may call `log` (others return immediately). `reduce_metrics` turns per-rank
sums into global means with one all-reduce (see its docstring for the convention).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("opsd_megatron")

TIME_KEYS = ("time/",)
"""Metric-name prefixes that vary between runs (wall times); everything else is deterministic on CPU."""


def reduce_sums(sums: dict[str, float], group=None, divide_by: float = 1.0) -> dict[str, float]:
    """All-reduce a dict of float sums (SUM, float64, fixed key order) over `group`; divide by `divide_by`.

    Every rank must pass the same keys (zeros where it has nothing). Collective: one all-reduce.
    """
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return {k: float(v) / divide_by for k, v in zip(keys, t.tolist())}


class MetricsLogger:
    """Rank-0 sink for step metrics (jsonl + TensorBoard + optional W&B + progress bar)."""

    def __init__(
        self,
        output_dir: str | Path,
        logging_cfg: Any,
        *,
        total_steps: int,
        start_step: int = 0,
        run_config: dict | None = None,
        rank: int = 0,
    ) -> None:
        self.rank = rank
        self.cfg = logging_cfg
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = self.wandb = self.bar = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
        if logging_cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=logging_cfg.wandb_project,
                name=logging_cfg.wandb_run_name,
                config=run_config,
                resume="allow",
            )
        if logging_cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="opsd", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps > `step` (written after the checkpoint the run resumes from)."""
        if not self.path.exists():
            return
        keep = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        row = {
            "step": step,
            **{
                k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in sorted(metrics.items())
            },
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        short = {
            k: metrics[k] for k in ("loss", "divergence", "rollout/accuracy", "time/step_s") if k in metrics
        }
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in short.items()})
        if self.cfg.log_interval and step % self.cfg.log_interval == 0:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in short.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of `<output_dir>/metrics.jsonl`, in order."""
    p = Path(output_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def deterministic_view(row: dict) -> dict:
    """A metrics row without wall-time entries (what must be bit-identical across a resume)."""
    return {k: v for k, v in row.items() if not k.startswith(TIME_KEYS) and "per_s" not in k}


def summary_table(rows: list[dict], keys: list[str]) -> str:
    """A small fixed-width table of `keys` per step (for the demo's final print)."""
    head = ["step"] + [k.split("/")[-1] for k in keys]
    widths = [max(6, len(h)) for h in head]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    for r in rows:
        cells = [str(r["step"])] + [
            "-" if r.get(k) is None else (f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]))
            for k in keys
        ]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)
