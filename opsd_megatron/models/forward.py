"""A plain pipelined forward for evaluation, verification and tests (no Megatron schedule, no grad).

    logits = forward_logits(chunks, input_ids)   # last PP stage: [b, s, vocab_size]; other stages: None

Stage p receives the hidden states [s, b, h] from stage p-1 (point-to-point send/recv over the world
group, pipeline neighbours from Megatron's parallel_state), runs its chunk and sends to p+1. The last stage
all-gathers the vocabulary-parallel logits over TP and drops the padding. One chunk per rank (no virtual
pipeline). Training uses Megatron's `get_forward_backward_func` schedules instead.
Note: Megatron's RoPE uses positions 0..s-1 of each row (position_ids are not used for RoPE).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.models.builder import model_info, unwrap
from opsd_megatron.models.vocab import gather_true_vocab_logits


@torch.no_grad()
def forward_logits(
    model_chunks: list,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gather_vocab: bool = True,
) -> torch.Tensor | None:
    """input_ids [b, s] (same on all ranks) -> logits [b, s, vocab_size] on the last stage, None elsewhere.

    With gather_vocab=False the last stage returns the vocab-parallel padded shard [b, s, v_padded/tp].
    Collectives: PP send/recv of [s, b, h] between neighbouring stages; TP all-gather of the logits.
    """
    from megatron.core import parallel_state as mps

    if len(model_chunks) != 1:
        raise ValueError(f"forward_logits supports one model chunk per rank, got {len(model_chunks)}.")
    chunk = model_chunks[0]
    model = unwrap(chunk)
    info = model_info(model)
    cfg = model.config
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    b, s = input_ids.shape
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    first, last = mps.is_pipeline_first_stage(), mps.is_pipeline_last_stage()
    was_training = chunk.training
    chunk.eval()
    try:
        if not first:
            h = torch.empty(s, b, cfg.hidden_size, dtype=cfg.pipeline_dtype or info.dtype, device=device)
            dist.recv(h, src=mps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(h)
        out = chunk(input_ids if first else None, position_ids, attention_mask)
        if not last:
            dist.send(out.contiguous(), dst=mps.get_pipeline_model_parallel_next_rank())
            return None
    finally:
        chunk.train(was_training)
    if not gather_vocab:
        return out
    return gather_true_vocab_logits(out, info)
