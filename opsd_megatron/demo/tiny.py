"""Tiny, self-made models for tests, the demo and benchmarks: no model hub needed.

`build_tiny_tokenizer(dir)` trains a byte-level BPE tokenizer with `tokenizers` on a synthetic math
corpus and saves it in Hugging Face format with a Qwen3-style chat template (thinking on/off).
`make_tiny_hf_model(dir, arch)` writes a randomly initialised `transformers` model of one of the supported
architectures (Qwen3, Qwen3-MoE, Qwen2, Llama 3), head_dim >= 32 (vLLM CPU attention needs it), with a
vocabulary size that is not a multiple of 8, so vocabulary padding is always exercised.

The same loading code that reads these directories serves real hub checkpoints.

    python -m opsd_megatron.demo.tiny OUT_DIR --arch qwen3
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's behaviour in a small template: thinking off inserts an empty think block after the
# generation prompt; thinking on (default) leaves the model to open <think> itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

TOKENIZER_VOCAB = 700  # target BPE size (byte alphabet + merges + specials)
MODEL_VOCAB = 731  # model vocab_size: >= tokenizer size, not divisible by 8 (nor by 2)

_COMMON = dict(
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
)
"""Shared by every tiny architecture (GQA 4/2, 4 layers); each entry below overrides what it changes."""

ARCH_CONFIGS: dict[str, dict] = {
    # Qwen3 dense: q/k RMSNorm, head_dim (32) != hidden / heads (64 / 4 = 16), GQA 4/2, tied embeddings.
    "qwen3": dict(
        _COMMON,
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=96,
        head_dim=32,
        tie_word_embeddings=True,
        attention_bias=False,
    ),
    # Qwen3-MoE: 8 experts, top-2 (renormalised), q/k norm, head_dim 32; layer 0 dense (mlp_only_layers),
    # so both the dense and the expert MLP paths are exercised. Untied embeddings, like Qwen3-30B-A3B.
    "qwen3_moe": dict(
        _COMMON,
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        head_dim=32,
        attention_bias=False,
        router_aux_loss_coef=0.001,
    ),
    # Qwen2 / Qwen2.5: qkv bias, head_dim = hidden / heads, untied embeddings.
    "qwen2": dict(
        _COMMON,
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=128,
        intermediate_size=160,
    ),
    # Llama 3.x: rope_scaling type llama3, untied embeddings, GQA.
    "llama": dict(
        _COMMON,
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=128,
        intermediate_size=192,
        rope_theta=500_000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
        rms_norm_eps=1e-5,
        attention_bias=False,
        mlp_bias=False,
    ),
}


# The real shape the GPU checks use (random weights): Qwen3-1.7B, tied embeddings, GQA 16/8, head_dim 128.
QWEN3_1_7B_SHAPE: dict = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
)


# Qwen3-30B-A3B (48 layers, 128 experts, top-8, GQA 32/4, head_dim 128): the MoE shape for a lent GPU.
QWEN3_30B_A3B_SHAPE: dict = dict(
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
)


def synthetic_math_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic small math texts (problems, worked solutions, prompt boilerplate) for BPE training."""
    rng = random.Random(seed)
    boiler = [
        "Problem: ",
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "Here is a reference solution to this problem:\n=== Reference Solution Begin ===\n",
        "=== Reference Solution End ===\n",
        "After understanding the reference solution, please try to solve this problem using your own "
        "approach below. Derive the same final answer in your own words, step by step.",
    ]
    texts = list(boiler)
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        texts.append(
            f"Problem: What is {a} + {b} times {c}?\n"
            f"Solution: First compute {b} \\times {c} = {b * c}. Then {a} + {b * c} = {a + b * c}. "
            f"The answer is \\boxed{{{a + b * c}}}."
        )
        texts.append(
            f"Problem: Solve for x: {c}x + {a} = {a + c * b}. Subtracting {a} gives {c}x = {c * b}, "
            f"so x = \\frac{{{c * b}}}{{{c}}} = {b}. Therefore \\boxed{{{b}}}."
        )
    return texts


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = TOKENIZER_VOCAB):
    """Train a byte-level BPE tokenizer locally and save it (HF format + chat template) to `out_dir`.

    Returns the `transformers.PreTrainedTokenizerFast`.
    """
    return train_bpe_tokenizer(out_dir, synthetic_math_corpus(), vocab_size)


def train_bpe_tokenizer(out_dir: str | Path, corpus, vocab_size: int, *, individual_digits: bool = False):
    """Train a byte-level BPE tokenizer on `corpus` (an iterable of texts) with the chat template and the
    special tokens of the tiny models, save it (HF format) to `out_dir`, return the
    `transformers.PreTrainedTokenizerFast`. `individual_digits`: split digits into one token each first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits = pre_tokenizers.Digits(individual_digits=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level]) if individual_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def tiny_hf_config(arch: str = "qwen3", vocab_size: int = MODEL_VOCAB, **overrides):
    """A `transformers` config for a tiny model of `arch` in {"qwen3", "qwen3_moe", "qwen2", "llama"}."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"tiny arch {arch!r} is not one of {sorted(ARCH_CONFIGS)}")
    fields = dict(ARCH_CONFIGS[arch])
    fields.update(vocab_size=vocab_size, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def make_tiny_hf_model(
    out_dir: str | Path,
    arch: str = "qwen3",
    *,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer_dir: str | Path | None = None,
    init_std: float = 1.0,
    **config_overrides,
) -> Path:
    """Write a randomly initialised tiny HF model (safetensors + config + tokenizer) to `out_dir`.

    `init_std` is large on purpose: logits of a tiny random model at the default 0.02 are nearly
    uniform, which would let wrong weight mappings pass logit comparisons.
    Norm weights are randomised too (around 1) so that a swapped norm cannot hide.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tok = build_tiny_tokenizer(out_dir)
    else:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.save_pretrained(str(out_dir))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = tiny_hf_config(arch, eos_token_id=eos, pad_token_id=pad, **config_overrides)
    cfg.initializer_range = init_std / 4
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (init_std / p.shape[-1] ** 0.5))
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(str(out_dir), safe_serialization=True)
    gen_cfg = {"eos_token_id": eos, "pad_token_id": pad}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a tiny random HF model + local tokenizer.")
    ap.add_argument("out_dir")
    ap.add_argument("--arch", default="qwen3", choices=sorted(ARCH_CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    make_tiny_hf_model(args.out_dir, args.arch, seed=args.seed, dtype=args.dtype)


if __name__ == "__main__":
    main()
