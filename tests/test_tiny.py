"""The tiny fixtures are what every other test stands on: check they are what they claim."""

import json

import pytest

pytestmark = pytest.mark.no_mcore  # never imports megatron: run once (tests/no_mcore.py)


def test_tiny_models_shape(tiny_models):
    for arch in ("qwen3", "qwen2", "llama"):
        cfg = json.loads((tiny_models(arch) / "config.json").read_text())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        assert head_dim >= 32, arch
        assert cfg["vocab_size"] % 8 != 0, arch


def test_tiny_chat_template_thinking_switch(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    msgs = [{"role": "user", "content": "Problem: 1+1"}]
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
