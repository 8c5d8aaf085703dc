"""How long a sequence the colocated rollout engine must hold: every generation it serves, not just rollouts.

    max_model_len = engine_max_model_len(cfg)    # cfg: OPSDConfig

The trainer's engine generates training rollouts (`rollout.max_new_tokens`) and, with `eval.interval > 0`,
the periodic evaluation (`eval.max_new_tokens`, e.g. 38,912 in the paper recipes against 1,024 for rollouts).
vLLM stops a request that reaches `max_model_len` with finish reason "length" and no error, so an engine sized
for rollouts alone silently truncates every long evaluation answer. Prompts of either kind are bounded by
`prompts.max_prompt_tokens` (training rows are checked at start-up, `opsd_megatron.data.prompt_check`).
"""

from __future__ import annotations

from typing import Any


def engine_max_model_len(cfg: Any) -> int:
    """`prompts.max_prompt_tokens` + the largest of `rollout.max_new_tokens` and (evaluation on)
    `eval.max_new_tokens`."""
    budget = cfg.rollout.max_new_tokens
    if cfg.eval.interval:
        budget = max(budget, cfg.eval.max_new_tokens)
    return cfg.prompts.max_prompt_tokens + budget
