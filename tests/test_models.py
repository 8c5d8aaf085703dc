"""Config-level checks of opsd_megatron.mcore.models (in-process, no Megatron, no process groups): HF config
parsing for the three architectures, vocab padding, llama3 RoPE frequencies vs transformers, and the
user-facing error messages for unsupported architectures and TP/PP sizes that do not divide the model."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.mcore.models import builder
from opsd_megatron.mcore.models.hf_config import parse_hf_config, rope_inv_freq


def test_parse_three_architectures(tiny_models):
    q3, _ = parse_hf_config(tiny_models("qwen3"))
    assert (q3.architecture, q3.qk_norm, q3.qkv_bias, q3.tie_word_embeddings) == (
        "Qwen3ForCausalLM",
        True,
        False,
        True,
    )
    assert q3.head_dim == 32 and q3.hidden_size // q3.num_heads == 16 and q3.num_kv_heads == 2
    q2, _ = parse_hf_config(tiny_models("qwen2"))
    assert (q2.qk_norm, q2.qkv_bias, q2.tie_word_embeddings) == (False, True, False)
    ll, raw = parse_hf_config(tiny_models("llama"))
    assert ll.rope_scaling["original_max_position_embeddings"] == 256 and ll.vocab_size == 731
    # transformers-4 spelling of the same config reads the same.
    old = dict(raw)
    rope = old.pop("rope_parameters")
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = rope
    assert parse_hf_config(old)[0] == ll


def test_llama3_rope_matches_transformers(tiny_models):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.from_pretrained(str(tiny_models("llama")))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    spec, _ = parse_hf_config(cfg)
    torch.testing.assert_close(rope_inv_freq(spec), ref.float(), rtol=1e-6, atol=0)


def test_padded_vocab_size():
    assert builder.padded_vocab_size(731, 1) == 768
    assert builder.padded_vocab_size(731, 2) == 768
    assert builder.padded_vocab_size(800, 2) == 1024
    assert builder.padded_vocab_size(151936, 4) == 152064


def test_unsupported_architecture_message(tiny_models):
    _, raw = parse_hf_config(tiny_models("qwen3"))
    raw["architectures"] = ["MixtralForCausalLM"]
    with pytest.raises(ValueError) as e:
        parse_hf_config(raw)
    msg = str(e.value)
    assert "MixtralForCausalLM" in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_tp_pp_divisibility_messages(tiny_models):
    spec, _ = parse_hf_config(tiny_models("qwen3"))  # 4 heads, 2 kv heads, ffn 96, 4 layers
    with pytest.raises(
        ValueError, match=r"tensor parallel size 3 does not divide HF config 'num_attention_heads' \(4\)"
    ):
        builder._check_divisibility(spec, 3, 1, None)
    with pytest.raises(
        ValueError, match=r"tensor parallel size 4 does not divide HF config 'num_key_value_heads' \(2\)"
    ):
        builder._check_divisibility(spec, 4, 1, None)
    odd_ffn = parse_hf_config({**parse_hf_config(tiny_models("qwen3"))[1], "intermediate_size": 97})[0]
    with pytest.raises(ValueError, match=r"'intermediate_size' \(97\)"):
        builder._check_divisibility(odd_ffn, 2, 1, None)
    with pytest.raises(
        ValueError, match=r"pipeline parallel size 3 does not divide HF config 'num_hidden_layers' \(4\)"
    ):
        builder._check_divisibility(spec, 1, 3, None)
    with pytest.raises(
        ValueError, match=r"'parallel.pipeline_layers': \[1, 2\] sums to 3, but the model has 4 layers"
    ):
        builder._check_divisibility(spec, 1, 2, [1, 2])
    builder._check_divisibility(spec, 2, 2, None)
    builder._check_divisibility(spec, 1, 2, [1, 3])
