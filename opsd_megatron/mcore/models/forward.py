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
from megatron.core import parallel_state as mps
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from opsd_megatron.mcore.models.builder import model_info, unwrap
from opsd_megatron.mcore.models.vocab import gather_true_vocab_logits


@torch.no_grad()
def padding_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """[b] unpadded lengths -> [b, length] bool, True at the end padding (Megatron's MoE `padding_mask`)."""
    return torch.arange(length, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


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


def output_weight(chunk) -> torch.Tensor:
    """The last stage's vocabulary-parallel LM-head weight `[v_padded/tp, h]` (tied embedding or untied
    `output_layer.weight`), the very Parameter Megatron's output layer multiplies with."""
    model = unwrap(chunk)
    if not model.post_process:
        raise ValueError("output_weight: this chunk is not on the last pipeline stage (no LM head).")
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def _gather_sequence(h: torch.Tensor, group) -> torch.Tensor:
    """[s/tp, b, h] sequence-parallel shards -> [s, b, h]; backward: reduce-scatter (sums the TP ranks'
    partial gradients, as Megatron's output layer does with sequence parallelism)."""

    return gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=group)


def _moe_padding_kwargs(model, lengths: torch.Tensor | None, seq_len: int) -> dict:
    """`padding_mask=` for a mixture-of-experts chunk: [b, s] bool, True at the end padding of each row
    (rows are `lengths` long), so Megatron's router leaves padding out of the load-balancing and z losses.
    {} for dense models or without lengths. With sequence parallelism, stages after the first receive the
    sequence already split over TP, and Megatron scatters the mask only on the first stage: here the later
    stages get this TP rank's contiguous slice of the sequence (the split that
    `scatter_to_sequence_parallel_region` makes)."""
    if lengths is None or not getattr(model.config, "num_moe_experts", None):
        return {}

    mask = padding_mask(lengths, seq_len)  # [b, s]
    if model.config.sequence_parallel and not model.pre_process:
        tp, rank = mps.get_tensor_model_parallel_world_size(), mps.get_tensor_model_parallel_rank()
        part = seq_len // tp
        mask = mask[:, rank * part : (rank + 1) * part].contiguous()
    return {"padding_mask": mask}


def hidden_states_forward(
    chunk, input_ids, position_ids, attention_mask=None, *, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Run one model chunk, stopping before the LM head on the last pipeline stage.

    `lengths` [b] (unpadded row lengths; rows are padded at the end): for mixture-of-experts models the
    padding is masked out of the router's load-balancing and z losses (`_moe_padding_kwargs`).

    Last stage: the final hidden states (after the final norm) `[b, s, h]`, full sequence (gathered over TP
    when `config.sequence_parallel`; that gather's backward reduce-scatters the gradient, so a loss on these
    states must not all-reduce its hidden gradient itself). Other stages: exactly what the chunk returns
    (the `[s, b, h]` activations the pipeline schedule sends on). For Megatron's schedules: call it from the
    forward-step function with the (DDP-wrapped) chunk the schedule passes in. No tensor of vocabulary
    width is created. The output layer is bypassed only for the duration of this call (its `forward` is
    replaced by a pass-through on the instance), so `forward_logits` and checkpoints are unaffected.
    """
    model = unwrap(chunk)
    kw = _moe_padding_kwargs(model, lengths, position_ids.shape[1])
    if not model.post_process:
        return chunk(input_ids, position_ids, attention_mask, **kw)
    layer = model.output_layer
    sp_group = layer.tp_group if model.config.sequence_parallel else None

    def pass_through(hidden, weight=None, runtime_gather_output=None):  # [s(/tp), b, h]
        return (hidden if sp_group is None else _gather_sequence(hidden, sp_group)), None

    layer.forward = pass_through
    try:
        return chunk(input_ids, position_ids, attention_mask, **kw)  # GPTModel: [s, b, h] -> [b, s, h]
    finally:
        del layer.forward  # back to the class's forward
