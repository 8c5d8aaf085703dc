"""The trainer's periodic evaluation: one call every `eval.interval` steps, flat metrics back for the logger.

    if cfg.eval.interval and step % cfg.eval.interval == 0 and self.engine is not None:   # after weight sync
        metrics = periodic_eval(self.engine, self.tokenizer, cfg.eval, step, cfg.output_dir)
        logger.log(metrics, step)          # {"eval/<benchmark>/avg@n": ..., "eval/overall/pass@1": ...}

Runs on global rank 0, the one writer; the trainer passes a `rollout.engine_group.Spread`, so every
`generate` call is split over all engine replicas while the other ranks serve (every replica holds the same
weights; per-sample seeds make the result that of one engine). Outputs go to `<output_dir>/eval/step_XXXXXX/`,
so an evaluation cut by a preemption resumes when the step is evaluated again. Reads from the config object
`eval.path` (one benchmark spec) or `eval.benchmarks` (a list), `eval.n`, `eval.max_new_tokens`, and, when
the config has them, `temperature` (1.0), `top_p` (0.95), `top_k` (-1), `thinking` (True), `seed` (0).

Engine state: the trainer calls this right after the weight refresh, with the engine awake; `wake_up()` here
only matters for callers that left it asleep, and the engine is left awake (the next rollout needs it so).
The engine must hold prompt + `eval.max_new_tokens` tokens (the trainer sizes it so,
`config.checks.engine_max_model_len`); `{prefix}/truncated_fraction` is the share of samples that stopped at
the length limit (finish reason "length"), warned about when above zero.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from opsd_megatron.evaluation.grader import DEFAULT_TIMEOUT_S, default_pool
from opsd_megatron.evaluation.report import flat_metrics
from opsd_megatron.evaluation.runner import evaluate
from opsd_megatron.rollout.base import SamplingConfig

logger = logging.getLogger(__name__)


def periodic_eval(
    engine: Any,
    tokenizer: Any,
    eval_cfg: Any,
    step: int,
    output_dir: str | Path,
    *,
    prefix: str = "eval",
    grader_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, float]:
    """Evaluate the engine's current weights per `eval_cfg`; returns `{prefix}/{bench}/{metric}` floats."""
    benchmarks = list(getattr(eval_cfg, "benchmarks", None) or [eval_cfg.path])
    sampling = SamplingConfig(
        temperature=getattr(eval_cfg, "temperature", 1.0),
        top_p=getattr(eval_cfg, "top_p", 0.95),
        top_k=getattr(eval_cfg, "top_k", -1),
        max_new_tokens=eval_cfg.max_new_tokens,
        seed=getattr(eval_cfg, "seed", 0),
    )
    engine.wake_up()
    summary = evaluate(
        engine,
        tokenizer,
        benchmarks,
        eval_cfg.n,
        sampling,
        Path(output_dir) / "eval" / f"step_{step:06d}",
        thinking=getattr(eval_cfg, "thinking", True),
        grader=default_pool(),
        grader_timeout_s=grader_timeout_s,
    )
    out = flat_metrics(summary, prefix)
    out[f"{prefix}/seconds"] = float(summary["seconds"])
    truncated = float(summary.get("overall", {}).get("truncated_rate", 0.0))
    out[f"{prefix}/truncated_fraction"] = truncated
    if truncated > 0:
        logger.warning(
            "evaluation at step %d: %.1f%% of the samples stopped at eval.max_new_tokens=%d (finish reason "
            "'length'); their answers are likely cut off", step, 100 * truncated, eval_cfg.max_new_tokens,
        )  # fmt: skip
    return out
