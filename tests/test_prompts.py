"""Prompts: the paper's exact templates, chat rendering with separate thinking switches, overrides."""

from __future__ import annotations

import pytest

from opsd_megatron.config import PromptConfig
from opsd_megatron.data.prompts import (
    STUDENT_TEMPLATE,
    TEACHER_TEMPLATE,
    fill_template,
    render_pair,
    render_student_ids,
    render_teacher_ids,
)

pytestmark = pytest.mark.no_mcore  # never imports megatron: run once (tests/no_mcore.py)


def test_templates_match_spec():
    assert STUDENT_TEMPLATE == (
        "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    t = fill_template(TEACHER_TEMPLATE, "P?", "S.")
    assert t.startswith(
        "Problem: P?\n\nHere is a reference solution to this problem:\n"
        "=== Reference Solution Begin ===\nS.\n=== Reference Solution End ===\n"
    )
    assert "do not copy or paraphrase it" in t and "derive the same final answer" in t
    assert t.endswith(":\n\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert fill_template("{problem} \\boxed{} {x}", "a") == "a \\boxed{} {x}"  # other braces untouched


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def test_thinking_switches_and_rendering(tok):
    s = tok.decode(render_student_ids(tok, "What is 1 + 1?"))
    t = tok.decode(render_teacher_ids(tok, "What is 1 + 1?", "1 + 1 = 2, \\boxed{2}."))
    assert s.startswith("<|im_start|>user\nProblem: What is 1 + 1?\n\nPlease reason")
    assert s.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    assert t.endswith("\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")  # thinking on: model opens <think>
    assert "=== Reference Solution Begin ===\n1 + 1 = 2, \\boxed{2}.\n" in t
    cfg = PromptConfig(student_thinking=True, teacher_thinking=False, student_template="Q: {problem}")
    s2, t2 = render_pair(tok, "x", "y", cfg)
    assert tok.decode(s2) == "<|im_start|>user\nQ: x<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(t2).endswith("<think>\n\n</think>\n\n")


def test_no_chat_template_is_a_clear_error(tok):
    import copy

    t = copy.copy(tok)
    t.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        render_student_ids(t, "x")
