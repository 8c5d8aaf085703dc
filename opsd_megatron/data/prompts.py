"""The paper's student and teacher prompts, rendered through the tokenizer's chat template.

The student sees the problem only (thinking off, as the paper's recipe); the teacher sees the problem plus the
verified reference solution and a transition paragraph (thinking on). Both are one user turn rendered with
`add_generation_prompt=True`; the teacher never generates, it scores the student's response appended to its
own prompt (see `opsd_megatron.step.batch`).

Templates substitute `{problem}` and `{solution}` literally (not `str.format`: `\\boxed{}` has braces), and
are overridable in the config (`prompts.student_template`, `prompts.teacher_template`).

    s_ids = render_student_ids(tokenizer, "What is 2 + 3?")
    t_ids = render_teacher_ids(tokenizer, "What is 2 + 3?", "2 + 3 = 5, so \\\\boxed{5}.")
"""

from __future__ import annotations

import random
from typing import Any

ANSWER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The instruction ending both prompts (and the paper's evaluation prompt)."""

TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand "
    "the reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your "
    "own words and independent reasoning, derive the same final answer to the problem above. "
    "Think step by step, explore different approaches, and don't be afraid to backtrack "
    "or reconsider if something doesn't work out:\n"
)
"""The OPSD reference's transition paragraph between the reference solution and the instruction."""

STUDENT_TEMPLATE = "Problem: {problem}\n\n" + ANSWER_INSTRUCTION
"""Student user turn (docs/algorithm.md)."""

TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
    + TRANSITION
    + "\n"
    + ANSWER_INSTRUCTION
)
"""Teacher user turn: problem, privileged reference solution, transition, instruction (docs/algorithm.md)."""


def fill_template(template: str, problem: str, solution: str | None = None) -> str:
    """Substitute `{problem}` (and `{solution}`) literally; other braces are left untouched."""
    text = template.replace("{problem}", problem)
    if solution is not None:
        text = text.replace("{solution}", solution)
    return text


def render_chat(tokenizer: Any, user_text: str, *, thinking: bool) -> str:
    """One user turn through the chat template with a generation prompt; `thinking` -> `enable_thinking`."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "OPSD prompts need one (set tokenizer.chat_template or use a chat/instruct model)."
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=thinking,
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_student_ids(
    tokenizer: Any, problem: str, *, template: str = STUDENT_TEMPLATE, thinking: bool = False
) -> list[int]:
    """Token ids of the student prompt (chat-rendered, generation prompt included)."""
    return _encode(tokenizer, render_chat(tokenizer, fill_template(template, problem), thinking=thinking))


def render_teacher_ids(
    tokenizer: Any,
    problem: str,
    solution: str,
    *,
    template: str = TEACHER_TEMPLATE,
    thinking: bool = True,
) -> list[int]:
    """Token ids of the teacher prompt (chat-rendered, generation prompt included)."""
    return _encode(
        tokenizer, render_chat(tokenizer, fill_template(template, problem, solution), thinking=thinking)
    )


PRIVILEGED_MODES = (True, False, "shuffled", "blank")
"""`teacher.privileged`: what the teacher is shown. true: the problem's reference solution (OPSD); the
controls: false = the student's own prompt (teacher = student at θ₀: the loss starts at exactly 0, a control
that cannot fail); "shuffled" = the teacher's template and thinking switch with ANOTHER training problem's
reference solution (`derangement`); "blank" = the teacher's template with an empty solution."""


def derangement(n: int, seed: int) -> list[int]:
    """A permutation of range(n) with no fixed point (Sattolo's algorithm: one random n-cycle), a pure
    function of (n, seed); n >= 2 (raises ValueError otherwise)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}.")
    perm, rng = list(range(n)), random.Random(f"derangement/{n}/{seed}")
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: Sattolo (a single cycle, so perm[i] != i for every i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def shown_solution(privileged: bool | str, problems: list[Any], idx: int, perm: list[int] | None) -> str:
    """The reference solution (a `.solution` of `problems`) that the teacher of problem `idx` is shown under
    `teacher.privileged` (`PRIVILEGED_MODES`): its own, another problem's (`problems[perm[idx]]`, perm a
    `derangement`), or ""."""
    if privileged == "shuffled":
        if perm is None:
            raise ValueError("teacher.privileged=shuffled needs the derangement of the training problems.")
        return problems[perm[idx]].solution
    return "" if privileged == "blank" else problems[idx].solution


def render_pair(
    tokenizer: Any, problem: str, solution: str, prompts_cfg: Any = None, *, privileged: bool | str = True
) -> tuple[list[int], list[int]]:
    """(student ids, teacher ids) of one problem; templates/thinking from a `PromptConfig` or defaults.

    `privileged=False` (`teacher.privileged: false`, a control) gives the teacher the student's own prompt:
    no reference solution, same template and thinking switch. Any other mode renders the teacher template
    with `solution` as given (the caller picks it: `shown_solution`).
    """
    if prompts_cfg is None:
        s = render_student_ids(tokenizer, problem)
        return s, (list(s) if privileged is False else render_teacher_ids(tokenizer, problem, solution))
    s = render_student_ids(
        tokenizer, problem, template=prompts_cfg.student_template, thinking=prompts_cfg.student_thinking
    )
    if privileged is False:
        return s, list(s)
    t = render_teacher_ids(
        tokenizer,
        problem,
        solution,
        template=prompts_cfg.teacher_template,
        thinking=prompts_cfg.teacher_thinking,
    )
    return s, t
