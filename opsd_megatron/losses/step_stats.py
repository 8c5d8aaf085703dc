"""Per-token statistics gathered inside the fused loss's chunk loop, where each logits chunk exists once.

    loss, st = fused_linear_divergence(..., with_stats=True, sampling=sampling_cfg, target_ids=ids)
    st.clipped_fraction, st.student_entropy, st.teacher_entropy   # [T] fp32, 0 where masked
    st.token_logprobs                                              # [T] fp32 or None, 0 where masked

The per-token divergence is the loss itself (clip applied, as optimised); it is not repeated here.
`token_logprobs` are the student's log-probabilities of `target_ids` under the rollout engine's sampling
distribution (temperature, min-p, top-k, top-p: `token_logprobs.vocab_parallel_token_logprobs`, which
reproduces vLLM's `logprobs_mode="processed_logprobs"`), computed from the same student logits chunk as the
loss, before the chunk buffer is overwritten by its gradient. No extra pass over the vocabulary for the
whole batch: each statistic is one more read of a chunk that is already there.
Collectives (forward only, per chunk, over the TP group): those of `vocab_parallel_token_logprobs`, and for
the sparse kinds one dense statistics pass (all-gather [2, 2, c] + all-reduce SUM [5, c]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opsd_megatron.losses.token_logprobs import vocab_parallel_token_logprobs


@dataclass
class FusedStats:
    """Per-token statistics `[T]` (fp32, zero where `loss_mask` is 0)."""

    clipped_fraction: torch.Tensor
    """Fraction of the (real) vocabulary entries whose term was clamped at `clip` (dense kinds; else 0)."""
    student_entropy: torch.Tensor
    """Entropy of p_S (after the loss temperature), nats."""
    teacher_entropy: torch.Tensor
    """Entropy of p_T (after the loss temperature), nats."""
    token_logprobs: torch.Tensor | None
    """log p_S(target) under the sampling distribution; None unless `sampling` and `target_ids` were given."""


class StatsCollector:
    """Filled chunk by chunk by the fused loss; rows are indices into the `n_rows` rows the loop walks.

    Args:
        n_rows: rows of the chunk loop (the valid tokens of the dense path, all tokens of the sparse path).
        target_ids: `[n_rows]` global token ids for the drift logprobs (None: no logprobs).
        sampling: the engine's `SamplingConfig` (None: no logprobs).
        vocab_start: global id of this shard's first entry; group: the TP group.
    """

    def __init__(self, n_rows: int, device, target_ids, sampling, vocab_start: int, group) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        self.parts = torch.zeros((3, n_rows), **f32)  # clipped count, H(p_S), H(p_T)
        self.ids = target_ids
        self.sampling = sampling
        self.logprobs = (
            torch.zeros(n_rows, **f32) if (sampling is not None and target_ids is not None) else None
        )
        self.start, self.group = vocab_start, group

    def token_logprobs(self, a: int, b: int, ls: torch.Tensor) -> None:
        """Drift logprobs of rows [a, b) from the student's logits chunk `[c, v_valid]` (read only)."""
        if self.logprobs is None:
            return
        self.logprobs[a:b] = vocab_parallel_token_logprobs(
            ls, self.ids[a:b], self.sampling, tp_group=self.group, vocab_start_index=self.start
        )

    def extra(self, a: int, b: int, extra: torch.Tensor) -> None:
        """The dense phase's extra sums `[3, c]` (clipped count, H(p_S), H(p_T)), already TP-reduced."""
        self.parts[:, a:b] = extra

    def result(self, rows: torch.Tensor | None, n_tokens: int, mask: torch.Tensor | None, v_global: int):
        """`FusedStats` over all `n_tokens` positions (rows: the loop's token indices, None = identity)."""

        def spread(x: torch.Tensor) -> torch.Tensor:
            out = x if rows is None else x.new_zeros(n_tokens).index_copy_(0, rows, x)
            if mask is not None:  # masked rows of the sparse loop hold arbitrary values (-inf logprobs)
                out = torch.where(mask, out, torch.zeros_like(out))
            return out

        lp = None if self.logprobs is None else spread(self.logprobs)
        return FusedStats(spread(self.parts[0] / max(v_global, 1)), spread(self.parts[1]),
                          spread(self.parts[2]), lp)  # fmt: skip
