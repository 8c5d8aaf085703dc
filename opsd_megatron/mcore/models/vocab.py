"""The padded, vocabulary-parallel output of a Megatron GPT model, and how to see only the true vocabulary.

Megatron pads the vocabulary to `padded_vocab_size` (a multiple of 128 * TP) and splits it over TP ranks:
rank r holds logits for token ids [r * v_padded/tp, (r+1) * v_padded/tp). Ids >= `vocab_size` are padding
(zero weight rows, logit 0): they must never take probability mass. Use:

* `vocab_partition(info, tp_rank)` -> (vocab_start_index, vocab_end_index, n_valid_in_this_shard)
* `mask_padded_vocab(vocab_parallel_logits, info, tp_rank)` -> same shape, padding entries = -inf
* `gather_true_vocab_logits(vocab_parallel_logits, info, tp_group)` -> [..., vocab_size] (all-gather over TP)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mps

from opsd_megatron.mcore.models.builder import ModelInfo, model_info


def _info(info_or_chunks) -> ModelInfo:
    return info_or_chunks if isinstance(info_or_chunks, ModelInfo) else model_info(info_or_chunks)


def vocab_partition(info_or_chunks, tp_rank: int) -> tuple[int, int, int]:
    """(vocab_start_index, vocab_end_index, number of real (non-padding) ids in [start, end))."""
    info = _info(info_or_chunks)
    per = info.padded_vocab_size // info.tp
    start, end = tp_rank * per, (tp_rank + 1) * per
    return start, end, max(0, min(end, info.vocab_size) - start)


def mask_padded_vocab(vocab_parallel_logits: torch.Tensor, info_or_chunks, tp_rank: int) -> torch.Tensor:
    """[..., v_padded/tp] -> same shape with padding ids set to -inf (out of place; no collective)."""
    _, _, n_valid = vocab_partition(info_or_chunks, tp_rank)
    if n_valid == vocab_parallel_logits.shape[-1]:
        return vocab_parallel_logits
    pad = torch.zeros(vocab_parallel_logits.shape[-1], dtype=torch.bool, device=vocab_parallel_logits.device)
    pad[n_valid:] = True
    return vocab_parallel_logits.masked_fill(pad, float("-inf"))


def gather_true_vocab_logits(
    vocab_parallel_logits: torch.Tensor, info_or_chunks, tp_group=None
) -> torch.Tensor:
    """[..., v_padded/tp] -> [..., vocab_size]: all-gather over `tp_group` (forward only), drop padding."""
    info = _info(info_or_chunks)
    if tp_group is None:
        tp_group = mps.get_tensor_model_parallel_group()
    world = dist.get_world_size(tp_group) if dist.is_initialized() else 1
    if world == 1:
        full = vocab_parallel_logits
    else:
        parts = [torch.empty_like(vocab_parallel_logits) for _ in range(world)]
        dist.all_gather(parts, vocab_parallel_logits.contiguous(), group=tp_group)
        full = torch.cat(parts, dim=-1)
    return full[..., : info.vocab_size]
