"""Per-step metrics: `<output_dir>/metrics.jsonl` (one JSON object per optimizer step), TensorBoard always,
W&B when `logging.wandb_project` is set, and one progress line per step on rank 0
(`step 25/100 (25%) loss=... eta 0:12:31 | checkpoint saved | held-out avg@4=0.321`), or, with
`logging.progress_bar` on a terminal, a tqdm bar carrying the same fields. The markers come from the row:
`checkpoint/saved` (1.0 on a step that wrote a checkpoint) and `eval/overall/...` (a step that evaluated).

On resume nothing is truncated up front: a line of step k from the earlier run is replaced when the resumed
run logs step k again, so a resumed run that dies early leaves the earlier history in place. The W&B run id
is kept in `<output_dir>/wandb_run_id`, so a resumed run continues the same W&B run.

Only rank 0 writes; every rank may call `log` (others return immediately). `reduce_sums` turns per-rank
sums into global means with one all-reduce (see its docstring for the convention).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

log = logging.getLogger("opsd_megatron")

TIME_KEYS = ("time/", "checkpoint/")
"""Metric-name prefixes that vary between runs (wall times; which steps saved a checkpoint, which a stop
signal changes); everything else is deterministic on CPU."""
SAVED_KEY = "checkpoint/saved"
"""1.0 in a step's row when that step wrote a checkpoint: `checkpoint saved` on the progress line."""
HELDOUT_PREFIX = "eval/overall/"
"""A step's row holds `eval/overall/<metric>` when the step evaluated: on its line and in the summary."""
PROGRESS_KEYS = ("loss", "divergence", "rollout/accuracy", "time/step_s")
"""Metrics shown on the per-step progress line (and in the end-of-run summary)."""
WANDB_ID_FILE = "wandb_run_id"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _draws_a_bar(stream: Any) -> bool:
    """A terminal with a width (a pseudo-terminal of 0 columns, e.g. under `script`, would show nothing)."""
    if not stream.isatty():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError):  # no descriptor to ask (a wrapped stream): trust isatty
        return True


def wandb_run_id(output_dir: str | Path, generate: Callable[[], str]) -> str:
    """The W&B run id of the run in `output_dir`: the stored one, or a new one from `generate`, stored."""
    p = Path(output_dir) / WANDB_ID_FILE
    if p.is_file() and p.read_text().strip():
        return p.read_text().strip()
    run_id = generate()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(run_id + "\n")
    return run_id


def heldout_score(row: dict) -> tuple[str, float] | None:
    """(`avg@n`, value) of the held-out evaluation in `row` (`eval/overall/avg@*`, else `pass@1`), or None."""
    keys = [k for k in sorted(row) if k.startswith(HELDOUT_PREFIX) and _finite(row[k])]
    for want in ("avg@", "pass@1"):
        for k in keys:
            if k[len(HELDOUT_PREFIX) :].startswith(want):
                return k[len(HELDOUT_PREFIX) :], float(row[k])
    return None


def step_markers(row: dict) -> list[str]:
    """`checkpoint saved` and `held-out avg@4=0.321` for a step that saved / evaluated."""
    out = []
    if row.get(SAVED_KEY):
        out.append("checkpoint saved")
    score = heldout_score(row)
    if score is not None:
        out.append(f"held-out {score[0]}={score[1]:.4g}")
    return out


def _heldout_line(rows: list[dict]) -> str | None:
    evals = [(r["step"], s) for r in rows if (s := heldout_score(r)) is not None]
    if not evals:
        return None
    (s0, (name, v0)), (s1, (_, v1)) = evals[0], evals[-1]
    trend = f"{v0:.4g} (step {s0}) -> {v1:.4g} (step {s1})" if s1 != s0 else f"{v1:.4g} (step {s1})"
    return f"  held-out:   {name} {trend}  (eval/ in metrics.jsonl)"


def run_summary(rows: list[dict], *, output_dir: str | Path, seconds: float, start_step: int,
                total_steps: int, checkpoint: str | Path | None, hf_dir: str | Path | None,
                stopped_by: str | None = None) -> str:  # fmt: skip
    """The end-of-run summary `opsd-train` prints: steps, time, final metrics, where the outputs are."""
    out = Path(output_dir)
    end = rows[-1]["step"] if rows else start_step
    how = f"stopped by {stopped_by} at" if stopped_by else "finished"
    ran = f"ran steps {start_step + 1}..{end} in {_hms(seconds)}"
    lines = [f"opsd-train {how} step {end}/{total_steps}: {ran}"]
    if rows:
        last = rows[-1]
        vals = [f"{k.split('/')[-1]}={last[k]:.4g}" for k in PROGRESS_KEYS if _finite(last.get(k))]
        lines.append(f"  final metrics: {' '.join(vals)}")
        heldout = _heldout_line(rows)
        if heldout:
            lines.append(heldout)
    lines.append(f"  metrics:    {out / 'metrics.jsonl'}  (TensorBoard: {out / 'tensorboard'})")
    if (out / "rollouts.jsonl").is_file():
        lines.append(f"  rollouts:   {out / 'rollouts.jsonl'}")
    if checkpoint is not None:
        lines.append(f"  checkpoint: {checkpoint}  (resume: run the same command again)")
    if hf_dir is not None:
        lines.append(f"  HF export:  {hf_dir}")
    return "\n".join(lines)


def reduce_sums(sums: dict[str, float], group=None) -> dict[str, float]:
    """All-reduce a dict of float sums (SUM, float64, fixed key order) over `group`.

    Every rank must pass the same keys (zeros where it has nothing). Collective: one all-reduce.
    """
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


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
        self.tb = self.wandb = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total_steps, self.start_step = total_steps, start_step
        self._stale = self._earlier_steps(start_step)
        self._t0 = time.monotonic()
        self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
        self.bar = None
        if logging_cfg.progress_bar and _draws_a_bar(sys.stderr):  # a real bar on a terminal, lines elsewhere
            self.bar = tqdm(total=total_steps, initial=start_step, desc="step", file=sys.stderr,
                            dynamic_ncols=True, leave=True)  # fmt: skip
        if logging_cfg.wandb_project:
            import wandb  # optional: only with logging.wandb_project

            run_id = wandb_run_id(output_dir, wandb.util.generate_id)
            self.wandb = wandb.init(
                project=logging_cfg.wandb_project,
                name=logging_cfg.wandb_run_name,
                config=run_config,
                id=run_id,
                resume="allow",
            )

    def _earlier_steps(self, step: int) -> set[int]:
        """Steps > `step` that an earlier run already logged (replaced one by one when logged again)."""
        if not self.path.exists():
            return set()
        text = self.path.read_text()
        steps, good = set(), []
        for ln in text.splitlines():
            try:
                steps.add(int(json.loads(ln)["step"]))
                good.append(ln)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash
        if len(good) != len(text.splitlines()) or (text and not text.endswith("\n")):
            log.warning("%s: dropping %d unreadable line(s) before appending", self.path,
                        len(text.splitlines()) - len(good))  # fmt: skip
            self._write_lines(good)
        return {s for s in steps if s > step}

    def _write_lines(self, lines: list[str]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.replace(tmp, self.path)

    def _replace_line(self, step: int, line: str) -> None:
        """Rewrite metrics.jsonl with the earlier line of `step` replaced by `line` (atomic rename)."""
        out = []
        for ln in self.path.read_text().splitlines():
            try:
                same = int(json.loads(ln)["step"]) == step
            except (ValueError, KeyError, TypeError):
                continue  # a torn line from a crash: dropped
            out.append(line if same else ln)
        self._write_lines(out)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        row = {
            "step": step,
            **{
                k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in sorted(metrics.items())
            },
        }
        if step in self._stale:
            self._stale.discard(step)
            self._replace_line(step, json.dumps(row))
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            self.bar.set_postfix_str(" ".join(self._fields(metrics)), refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.cfg.log_interval and step % self.cfg.log_interval == 0:
            log.info("%s", self.progress_line(step, metrics))

    @staticmethod
    def _fields(metrics: dict[str, float]) -> list[str]:
        """The progress metrics, then the markers as `| ...` (the bar's postfix)."""
        short = [f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in PROGRESS_KEYS if _finite(metrics.get(k))]
        return short + [f"| {m}" for m in step_markers(metrics)]

    def progress_line(self, step: int, metrics: dict[str, float]) -> str:
        """`step 3/100 (3%) loss=0.2 divergence=0.2 accuracy=0 step_s=1.2 eta 0:01:57 | checkpoint saved`."""
        short = [f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in PROGRESS_KEYS if _finite(metrics.get(k))]
        head = f"step {step}/{self.total_steps} ({100 * step // max(self.total_steps, 1)}%)"
        done = step - self.start_step
        if self.cfg.progress_bar and done > 0:
            eta = (time.monotonic() - self._t0) / done * max(self.total_steps - step, 0)
            short.append(f"eta {_hms(eta)}")
        return " ".join([head, *short, *(f"| {m}" for m in step_markers(metrics))])

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of `<output_dir>/metrics.jsonl`, in order."""
    p = Path(output_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
