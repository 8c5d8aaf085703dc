"""Megatron-core GPT models built from Hugging Face configs (Llama 3.x, Qwen2/2.5, Qwen3 dense).

    chunks = build_model(hf_dir_or_config, dtype=torch.bfloat16)   # after parallel.initialize(tp, pp)
    info = model_info(chunks)      # spec, hf_config, vocab_size, padded_vocab_size, tp, pp, dtype
    logits = forward_logits(chunks, input_ids)   # last stage: [b, s, vocab_size]

See `builder.py` for the forward-call contract and `vocab.py` for handling the padded vocab-parallel logits.
"""

from opsd_megatron.mcore.models.builder import (
    ModelInfo,
    build_model,
    have_te,
    layer_spec,
    model_info,
    padded_vocab_size,
    transformer_config,
    unwrap,
)
from opsd_megatron.mcore.models.forward import forward_logits
from opsd_megatron.mcore.models.hf_config import SUPPORTED_ARCHITECTURES, ModelSpec, parse_hf_config
from opsd_megatron.mcore.models.vocab import gather_true_vocab_logits, mask_padded_vocab, vocab_partition

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelInfo",
    "ModelSpec",
    "build_model",
    "forward_logits",
    "gather_true_vocab_logits",
    "have_te",
    "layer_spec",
    "mask_padded_vocab",
    "model_info",
    "padded_vocab_size",
    "parse_hf_config",
    "transformer_config",
    "unwrap",
    "vocab_partition",
]
