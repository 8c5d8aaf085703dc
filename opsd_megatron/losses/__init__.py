"""Vocabulary-parallel divergence losses for self-distillation, fused with the LM head.

    vocab_parallel_divergence(student_logits, teacher_logits, *, kind, ...)   -> [...] per-position loss
    fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind, ...)
                                                                             -> [tokens] per-token loss
    divergence_metrics(student_logits, teacher_logits, *, kind, ...)         -> dict of 0-dim tensors
    token_mean(per_token, mask, num_valid_tokens) / sequence_mean(per_token, mask, num_sequences)

Importing this package needs only torch.
"""

from opsd_megatron.losses.fused_linear import fused_linear_divergence
from opsd_megatron.losses.metrics import divergence_metrics
from opsd_megatron.losses.reductions import sequence_mean, token_mean
from opsd_megatron.losses.vocab_parallel import vocab_parallel_divergence

__all__ = [
    "divergence_metrics",
    "fused_linear_divergence",
    "sequence_mean",
    "token_mean",
    "vocab_parallel_divergence",
]
