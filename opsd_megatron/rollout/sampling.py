"""The sampling distribution, written once: temperature → min-p → top-k → top-p, in vLLM 0.32's order.

`process_logits(logits, sampling)` returns the logits of the distribution a token is sampled from (masked
entries at -inf); `log_softmax` of it is what every engine reports as the sampled token's logprob. Greedy
(temperature 0) returns the raw logits, as vLLM does for greedy requests.

vLLM references (0.32): `Sampler.sample` (temperature, then argmax-invariant processors = min-p), then
`apply_top_k_top_p_pytorch` (top-k by value threshold, top-p on ascending-sorted cumulative probabilities,
at least one token kept).
"""

from __future__ import annotations

import torch

from opsd_megatron.rollout.base import SamplingConfig

_SAMPLING_EPS = 1e-5


def process_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Logits [..., v] -> float32 logits [..., v] of the distribution vLLM samples from (new tensor)."""
    out = logits.float().clone()  # [..., v]
    if sampling.temperature < _SAMPLING_EPS:
        return out
    out.div_(sampling.temperature)
    if sampling.min_p > 0:
        probs = out.softmax(dim=-1)  # [..., v]
        thresh = probs.amax(dim=-1, keepdim=True) * sampling.min_p  # [..., 1]
        out.masked_fill_(probs < thresh, -float("inf"))
    top_k = sampling.top_k if sampling.top_k and sampling.top_k > 0 else None
    top_p = sampling.top_p if sampling.top_p < 1.0 else None
    if top_k is None and top_p is None:
        return out
    sorted_logits, idx = out.sort(dim=-1, descending=False)  # ascending [..., v]
    if top_k is not None and top_k < out.shape[-1]:
        kth = sorted_logits[..., out.shape[-1] - top_k : out.shape[-1] - top_k + 1]  # [..., 1]
        sorted_logits.masked_fill_(sorted_logits < kth, -float("inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [..., v]
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # keep at least the top token
        sorted_logits.masked_fill_(drop, -float("inf"))
    return torch.empty_like(out).scatter_(-1, idx, sorted_logits)
