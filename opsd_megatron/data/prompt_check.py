"""Start-up check of every training row's rendered prompts against `prompts.max_prompt_tokens`.

    problems, dropped = drop_overlong_rows(problems, tokenizer, cfg.prompts, cfg.data.on_bad_row)

A row whose student or teacher prompt (chat-rendered, as `opsd_megatron.data.prompts.render_pair` makes it) is
longer than `prompts.max_prompt_tokens`, or fails to render, is handled here, before any heavy work, per
`data.on_bad_row`: `error` raises one `DataError` naming the row, the prompt and both lengths; `skip` drops it
and returns the count. Without this check such a row raised mid-run on the one rank that sampled it while the
other ranks waited for it in a collective.

Work is split over the ranks of the default process group (row i is rendered on rank i mod world) and the bad
rows are exchanged with one `all_gather_object`, so every rank keeps the same rows and raises the same error.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from opsd_megatron.data.loading import DataError, Problem
from opsd_megatron.data.prompts import fill_template, render_chat

log = logging.getLogger(__name__)


def _render_texts(tokenizer: Any, p: Problem, prompts_cfg: Any) -> tuple[str, str]:
    student = render_chat(
        tokenizer,
        fill_template(prompts_cfg.student_template, p.problem),
        thinking=prompts_cfg.student_thinking,
    )
    teacher = render_chat(
        tokenizer,
        fill_template(prompts_cfg.teacher_template, p.problem, p.solution),
        thinking=prompts_cfg.teacher_thinking,
    )
    return student, teacher


def find_bad_rows(problems: list[Problem], tokenizer: Any, prompts_cfg: Any, *, rank: int = 0,
                  world_size: int = 1) -> dict[int, str]:  # fmt: skip
    """This rank's share of the rows (i mod world_size == rank): {index in problems: why it is bad}."""
    limit = prompts_cfg.max_prompt_tokens
    mine = list(range(rank, len(problems), world_size))
    bad: dict[int, str] = {}
    texts: list[str] = []
    owners: list[int] = []
    for i in mine:
        try:
            texts.extend(_render_texts(tokenizer, problems[i], prompts_cfg))
            owners.append(i)
        except Exception as e:  # a row the chat template cannot render is a bad row, not a crash
            bad[i] = f"cannot be rendered ({type(e).__name__}: {e})"
    for start in range(0, len(texts), 2048):  # batched encoding (fast tokenizers run it in Rust)
        ids = tokenizer(texts[start : start + 2048], add_special_tokens=False)["input_ids"]
        for j in range(0, len(ids), 2):
            i = owners[(start + j) // 2]
            s_len, t_len = len(ids[j]), len(ids[j + 1])
            if max(s_len, t_len) > limit:
                which = "teacher" if t_len >= s_len else "student"
                bad[i] = (
                    f"has a {which} prompt of {max(s_len, t_len)} tokens (student {s_len}, teacher {t_len}), "
                    f"more than prompts.max_prompt_tokens={limit}"
                )
    return bad


def drop_overlong_rows(
    problems: list[Problem], tokenizer: Any, prompts_cfg: Any, on_bad_row: str, *, group: Any = None
) -> tuple[list[Problem], int]:
    """Check every row's prompts (split over the ranks of `group`, default the world); returns the rows to
    train on and how many were dropped. Raises `DataError` (same on every rank) per `on_bad_row`.

    Collective: one `all_gather_object` over `group` when torch.distributed is initialised with > 1 rank.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if distributed else (0, 1)
    bad = find_bad_rows(problems, tokenizer, prompts_cfg, rank=rank, world_size=world)
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, bad, group=group)
        bad = {i: why for part in gathered for i, why in part.items()}
    if not bad:
        return problems, 0
    if on_bad_row != "skip":
        first = min(bad)
        raise DataError(
            f"data row {problems[first].row} {bad[first]} ({len(bad)} such row(s); set data.on_bad_row: skip "
            "to skip them, or raise prompts.max_prompt_tokens)."
        )
    kept = [p for i, p in enumerate(problems) if i not in bad]
    if not kept:
        raise DataError(
            f"every one of the {len(problems)} data rows was dropped: {bad[min(bad)]} (row "
            f"{problems[min(bad)].row}); raise prompts.max_prompt_tokens."
        )
    log.warning("skipped %d data row(s) whose prompts do not fit, e.g. row %d %s", len(bad),
                problems[min(bad)].row, bad[min(bad)])  # fmt: skip
    return kept, len(bad)
