"""`<output_dir>/rollouts.jsonl`: a few sampled rollouts every `logging.rollout_interval` steps, to read.

One JSON object per rollout: step, data row, prompt (the problem text), response (decoded), response_tokens,
truncated, correct (rollout grading against the reference answer; null without one), divergence (mean
teacher/student per-token divergence over the response) and token_divergence (one float per response token,
as trained: clipped, at the loss temperature). Written by global rank 0 from its own replica's samples; with
PP > 1 rank 0 holds no loss values, so the divergence fields are null there. On resume, lines of steps after
the checkpoint are dropped when the resumed run writes its first record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FILE = "rollouts.jsonl"


def token_divergences(per_pos: list[Any], masks: list[Any], counts: list[int]) -> list[list[float]]:
    """Per-sample lists of per-token divergence from the loss's [b, R] tensors (micro-batch order).

    `per_pos[j]`, `masks[j]`: [b, R] of micro-batch j; `counts[j]`: real samples in it (the rest is padding).
    """
    out: list[list[float]] = []
    for d, m, n in zip(per_pos, masks, counts):
        for i in range(n):
            keep = m[i] > 0
            out.append([float(x) for x in d[i][keep].tolist()])
    return out


class RolloutLog:
    """Appends rollout records to `output_dir/rollouts.jsonl` on rank 0 every `interval` steps."""

    def __init__(self, output_dir: str | Path, interval: int, samples: int, *, rank: int = 0,
                 start_step: int = 0) -> None:  # fmt: skip
        self.path = Path(output_dir) / FILE
        self.interval, self.samples, self.rank = interval, samples, rank
        self._start_step: int | None = start_step

    def _drop_redone_steps(self) -> None:
        """At the first write of a resumed run: drop earlier lines of steps after its checkpoint."""
        start, self._start_step = self._start_step, None
        if not self.path.exists():
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                if int(json.loads(ln)["step"]) <= start:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                continue
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def due(self, step: int) -> bool:
        return self.rank == 0 and self.interval > 0 and step % self.interval == 0

    def write(self, step: int, records: list[dict]) -> None:
        """Append `records` (see `record`) of `step`."""
        if self._start_step is not None:
            self._drop_redone_steps()
        with self.path.open("a", encoding="utf-8") as f:
            for r in records[: self.samples]:
                f.write(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n")


def record(row: int, prompt: str, response: str, n_tokens: int, truncated: bool, correct: bool | None,
           token_div: list[float] | None) -> dict:  # fmt: skip
    """One rollouts.jsonl record (without the step)."""
    div = None
    if token_div:
        div = sum(token_div) / len(token_div)
        div = None if math.isnan(div) else div
    return {
        "row": row, "prompt": prompt, "response": response, "response_tokens": n_tokens,
        "truncated": truncated, "correct": correct, "divergence": div, "token_divergence": token_div,
    }  # fmt: skip
