"""Core attention for Megatron's local layer spec under context parallelism (`parallel.cp` > 1), the
"all_gather" CP variant (Transformer Engine's `cp_comm_type="all_gather"`) in plain PyTorch.

Megatron's local `DotProductAttention` refuses `context_parallel_size > 1` (TE only); `layer_spec` puts
`AllGatherCPAttention` in its place when the model is built with CP and without Transformer Engine (with TE,
TE's own context-parallel attention runs instead).

    attn = AllGatherCPAttention(config, layer_number, attn_mask_type, attention_type)   # as the local spec's
    ctx = attn(query, key, value, attention_mask=None)
      query     [s/CP, b, heads/tp, d]        this CP rank's positions, Megatron's load-balanced order
      key/value [s/CP, b, groups/tp, d]       (chunks i and 2·CP−1−i of 2·CP, `step.context_parallel`)
      attention_mask None (causal, the project's training passes: rows right-padded, which a causal
                model never sees) or bool [b, 1, s, s] over GLOBAL positions, True = masked out
      returns   [s/CP, b, heads/tp · d]

Collectives: per call one all-gather of K and one of V over the CP group (`[s, b, groups/tp, d]` each);
backward: the matching reduce-scatters (gradients of every rank's keys/values go back to the rank that
owns them). The gathered keys are put back in global order; the causal mask compares each local query's
global position with each key's. GQA: key/value heads repeated to the query heads, as Megatron does.
Scores and softmax in fp32, probabilities cast back to the input dtype for the value product.

Memory per rank and layer: the gathered K and V (2 · s · b · groups/tp · d) and the fp32 scores and
probabilities `[b, heads/tp, s/CP, s]`: 1/CP of the local spec's `[b, heads/tp, s, s]` at CP1; no `[s, s]`
tensor beyond this rank's query rows. (Not flash/online-softmax: the scores are materialised per rank.)
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state as mps
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule


def cp_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """[s/CP] int64: global positions of CP rank `rank`'s local sequence (chunks rank, 2·CP−1−rank of 2·CP
    equal chunks; `seq_len` a multiple of 2·CP). `step.context_parallel` re-exports it for the step."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not a multiple of 2 x context-parallel size {cp}.")
    c = seq_len // (2 * cp)
    lo = torch.arange(rank * c, (rank + 1) * c, device=device)
    hi = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([lo, hi])


def gather_global(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """x [s/CP, ...] (this rank's load-balanced chunks) -> [s, ...] in global order. Backward:
    reduce-scatter over `group` (each rank gets the summed gradient of its own positions)."""
    full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
    s = full.shape[0]
    order = torch.cat([cp_positions(s, cp, r, device=x.device) for r in range(cp)])  # gathered -> global
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(s, device=x.device)
    return full.index_select(0, inverse)


class AllGatherCPAttention(MegatronModule):
    """Drop-in for Megatron's local `DotProductAttention` under context parallelism (see the module
    docstring). No dropout (the project's configs have attention_dropout 0), no sliding window, no
    packed sequences, no attention bias, vanilla softmax: each is refused at construction or call."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, **_unused):  # fmt: skip
        super().__init__(config=config)
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        if p or config.window_size is not None or getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                "AllGatherCPAttention: attention dropout, sliding windows and non-vanilla softmax are not "
                "supported (context parallelism without Transformer Engine)."
            )
        self.cp_group = mps.get_context_parallel_group()
        self.cp = mps.get_context_parallel_world_size()
        tp = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        d = config.kv_channels
        # query-key layer scaling divides the scale by the layer number and multiplies the fp32 scores back
        # by it (Megatron's FusedScaleMaskSoftmax): with fp32 scores here, the net scale is this one
        self.scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):  # fmt: skip
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("AllGatherCPAttention: packed sequences and attention bias are not supported.")
        sq, b, n, d = query.shape
        key = gather_global(key, self.cp_group, self.cp)  # [s, b, g, d]
        value = gather_global(value, self.cp_group, self.cp)
        s = key.shape[0]
        if n // self.groups > 1:  # GQA
            key = key.repeat_interleave(n // self.groups, dim=2)
            value = value.repeat_interleave(n // self.groups, dim=2)
        q_pos = cp_positions(s, self.cp, mps.get_context_parallel_rank(), device=query.device)  # [s/CP]
        k_pos = torch.arange(s, device=query.device)
        masked = (k_pos.unsqueeze(0) > q_pos.unsqueeze(1)).view(1, 1, sq, s)  # causal, global positions
        if attention_mask is not None:  # [b, 1, s, s] global -> this rank's query rows
            masked = masked | attention_mask.index_select(2, q_pos)
        q = query.permute(1, 2, 0, 3).float()  # [b, n, sq, d]
        k = key.permute(1, 2, 3, 0).float()  # [b, n, d, s]
        scores = torch.matmul(q, k) * self.scale  # [b, n, sq, s] fp32
        scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        ctx = torch.matmul(probs, value.permute(1, 2, 0, 3))  # [b, n, sq, d]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, n * d)
