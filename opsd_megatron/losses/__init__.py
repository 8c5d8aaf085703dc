"""Vocabulary-parallel divergence losses for self-distillation, fused with the LM head.

    vocab_parallel_divergence(student_logits, teacher_logits, *, kind, ...)   -> [...] per-position loss
    fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind, ...)
                                                                             -> [tokens] per-token loss
    token_mean(per_token, mask, num_valid_tokens)                            -> 0-dim loss to back-propagate
    vocab_parallel_token_logprobs(logits, token_ids, sampling, ...)          -> [...] sampled-token logprobs

`kind` takes the config's `loss.kind` names (forward_kl, reverse_kl, jsd, top_k, sampled_token) and
"top_k_renorm" (`loss.top_k_tail=false`). Importing this package needs only torch.
"""

from opsd_megatron.losses.fused_linear import fused_linear_divergence
from opsd_megatron.losses.reductions import token_mean
from opsd_megatron.losses.token_logprobs import vocab_parallel_token_logprobs
from opsd_megatron.losses.vocab_parallel import vocab_parallel_divergence

__all__ = [
    "fused_linear_divergence",
    "token_mean",
    "vocab_parallel_divergence",
    "vocab_parallel_token_logprobs",
]
