"""A tiny Qwen3 and a digit-level tokenizer for the synthetic tasks (`opsd_megatron.demo.synthetic`).

    tok = build_task_tokenizer("runs/ws/init")                    # BPE, one token per digit, chat template
    make_task_model("runs/ws/init", tokenizer_dir="runs/ws/init")  # 4 layers, hidden 128, random weights

The tokenizer is byte-level BPE trained locally (no hub) on the task's rows and the student/teacher prompt
boilerplate, so prompts are short, while every digit stays its own token (`Digits(individual_digits=True)`):
column arithmetic is learnable by a 4-layer model in minutes. Chat template and special tokens are
`opsd_megatron.demo.tiny`'s (Qwen3-style, thinking on/off).
"""

from __future__ import annotations

from pathlib import Path

from opsd_megatron.data.prompts import STUDENT_TEMPLATE, TEACHER_TEMPLATE
from opsd_megatron.demo.synthetic import generate
from opsd_megatron.demo.tiny import MODEL_VOCAB, make_tiny_hf_model, train_bpe_tokenizer

TASK_TOKENIZER_VOCAB = 400
TASK_MODEL_SHAPE: dict = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=1024,
)  # fmt: skip
"""Qwen3 shape of the task model (~0.9 M parameters, 3.6 MB in float32)."""


def _corpus(seed: int = 0) -> list[str]:
    texts = [STUDENT_TEMPLATE, TEACHER_TEMPLATE, "<think>\n\n</think>\n\n", "user\n", "assistant\n"]
    for task in ("addition", "subtraction"):
        for r in generate(task, 300, seed=seed, min_digits=1, max_digits=5):
            texts.append(r["problem"] + "\n" + r["solution"])
    return texts * 2


def build_task_tokenizer(out_dir: str | Path, vocab_size: int = TASK_TOKENIZER_VOCAB):
    """Train the digit-level BPE tokenizer and save it (HF format, chat template) to `out_dir`."""
    return train_bpe_tokenizer(out_dir, _corpus(), vocab_size, individual_digits=True)


def make_task_model(out_dir: str | Path, *, seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised task model (Qwen3, `TASK_MODEL_SHAPE`) with the task tokenizer."""
    out_dir = Path(out_dir)
    if not (out_dir / "tokenizer.json").is_file():
        build_task_tokenizer(out_dir)
    shape = {**TASK_MODEL_SHAPE, **overrides}
    return make_tiny_hf_model(out_dir, "qwen3", seed=seed, tokenizer_dir=out_dir, vocab_size=MODEL_VOCAB,
                              **shape)  # fmt: skip
