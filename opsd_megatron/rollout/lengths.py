"""How long a sequence the colocated rollout engine must hold: every generation it serves, not just rollouts.

    max_model_len = engine_max_model_len(cfg)    # cfg: OPSDConfig (defined in config.checks: start-up
                                                 # checks it against the model's context)

The trainer's engine generates training rollouts (`rollout.max_new_tokens`) and, with `eval.interval > 0`,
the periodic evaluation (`eval.max_new_tokens`, e.g. 38,912 in the paper recipes against 1,024 for rollouts).
vLLM stops a request that reaches `max_model_len` with finish reason "length" and no error, so an engine sized
for rollouts alone silently truncates every long evaluation answer. Prompts of either kind are bounded by
`prompts.max_prompt_tokens` (training rows are checked at start-up, `opsd_megatron.data.prompt_check`).
"""

from __future__ import annotations

from opsd_megatron.config.checks import engine_max_model_len

__all__ = ["engine_max_model_len"]
