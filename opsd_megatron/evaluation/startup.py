"""Start-up check of the periodic evaluation's benchmarks: they load, and every rendered prompt fits.

    check_eval_prompts(cfg.eval, tokenizer, cfg.prompts.max_prompt_tokens)   # with eval.interval > 0

The trainer's engine is sized for `prompts.max_prompt_tokens` + the generation budget
(`config.checks.engine_max_model_len`). An evaluation prompt longer than `prompts.max_prompt_tokens` would
make vLLM reject the request at the first evaluation step, possibly hours into the run, and a benchmark file
that is missing or malformed would fail there too. Both are found here, before any heavy work, with one
`ConfigError` naming the key, the benchmark, the problem and the lengths. The prompts are rendered exactly as
`opsd_megatron.evaluation.hook.periodic_eval` renders them (`evaluation.runner.render_prompt_ids`, the eval
template, `eval.thinking`). No collective: every rank checks the same (small) benchmarks.
The training rows' prompts have their own check, `opsd_megatron.data.prompt_check` (per row, split over the
ranks, skip or raise per `data.on_bad_row`); the two share only the idea.
"""

from __future__ import annotations

from typing import Any

from opsd_megatron.config import ConfigError
from opsd_megatron.evaluation.benchmarks import load_benchmark
from opsd_megatron.evaluation.runner import longest_prompt


def check_eval_prompts(eval_cfg: Any, tokenizer: Any, max_prompt_tokens: int) -> int:
    """Load every benchmark of `eval_cfg` and check its prompts' token counts; returns the number of prompts.

    Raises `opsd_megatron.config.ConfigError` naming `eval.path` / `eval.benchmarks` when a benchmark cannot
    be loaded or a prompt has more than `max_prompt_tokens` tokens.
    """
    key = "eval.benchmarks" if getattr(eval_cfg, "benchmarks", None) else "eval.path"
    specs = list(getattr(eval_cfg, "benchmarks", None) or [eval_cfg.path])
    thinking = getattr(eval_cfg, "thinking", True)
    count = 0
    for spec in specs:
        try:
            bench = load_benchmark(spec)
        except Exception as e:  # missing file, unknown hub name offline, bad rows: one message at start-up
            raise ConfigError(f"config key {key!r}: benchmark {spec!r} cannot be loaded: {e}") from None
        count += len(bench.items)
        longest, where = longest_prompt(tokenizer, bench.items, thinking=thinking)
        if longest > max_prompt_tokens:
            raise ConfigError(
                f"config key {key!r}: benchmark {bench.name!r} problem {where!r} renders to a {longest}-"
                f"token prompt, more than prompts.max_prompt_tokens={max_prompt_tokens} (the rollout engine "
                "is sized from it); raise prompts.max_prompt_tokens or drop that problem."
            )
    return count
