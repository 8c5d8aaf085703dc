"""Rollout-vs-trainer drift: are the engine's weights the trainer's weights?

After a refresh, the next rollout's sampled-token logprobs (from the engine) are compared with the trainer's
logprobs of the same tokens under the same sampling distribution:

    lp_trainer = vocab_parallel_token_logprobs(logits, response_ids, sampling, vocab_size=hf_vocab)  # [b, s]
    metrics = compute_drift(lp_engine, lp_trainer, mask)   # {"drift/mean_abs_logprob", "drift/mult_prob_err"}
    DriftGuard(threshold=0.1).check(metrics, step=step)     # raises DriftError when out of sync

`vocab_parallel_token_logprobs` (`opsd_megatron.losses.token_logprobs`, shared with the fused loss's step
statistics) reproduces the engines' logprob semantics for vocabulary-parallel, padded logits.
Collectives: `compute_drift` with a `group`: one all-reduce SUM `[3]` and one all-reduce MAX (0-dim).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DRIFT_KEYS = ("drift/mean_abs_logprob", "drift/mult_prob_err")


class DriftError(RuntimeError):
    """The rollout engine's logprobs disagree with the trainer's: the engine is out of sync."""


def compute_drift(
    engine_logprobs: torch.Tensor,
    trainer_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Drift metrics over the masked positions.

    Args:
        engine_logprobs, trainer_logprobs: [b, s] float logprobs of the same sampled tokens.
        mask: [b, s] bool/0-1, True at response tokens to compare; None compares everything.
        group: when given, sums are all-reduced over it (e.g. the data-parallel group) so every rank gets the
            global means. Collective: one all-reduce SUM of 3 numbers.
    Returns:
        {"drift/mean_abs_logprob": mean |Δ|, "drift/mult_prob_err": mean(exp(|Δ|) - 1),
        "drift/max_abs_logprob": max |Δ|} (zeros when no position is selected).
    """
    if engine_logprobs.shape != trainer_logprobs.shape:
        raise ValueError(
            f"compute_drift: engine_logprobs has shape {tuple(engine_logprobs.shape)} but "
            f"trainer_logprobs has {tuple(trainer_logprobs.shape)}; they must match."
        )
    delta = (engine_logprobs.double() - trainer_logprobs.double()).abs()  # [b, s]
    if mask is None:
        mask = torch.ones_like(delta, dtype=torch.bool)
    elif mask.shape != delta.shape:
        raise ValueError(f"compute_drift: mask has shape {tuple(mask.shape)}, expected {tuple(delta.shape)}.")
    mask = mask.bool()
    delta = torch.where(mask, delta, torch.zeros_like(delta))
    sums = torch.stack([delta.sum(), torch.expm1(delta).sum(), mask.sum().double()])  # [3]
    dmax = delta.max() if delta.numel() else torch.zeros((), dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(dmax, op=dist.ReduceOp.MAX, group=group)
    count = max(sums[2].item(), 1.0)
    return {
        "drift/mean_abs_logprob": sums[0].item() / count,
        "drift/mult_prob_err": sums[1].item() / count,
        "drift/max_abs_logprob": float(dmax.item()),
    }


class DriftGuard:
    """Stop the run when the engine is clearly out of sync.

    Args:
        threshold: largest acceptable value of `metric` (e.g. 0.1 in bf16; ~1e-4 is reachable in fp32).
        metric: which drift metric to test; default the multiplicative probability error.
    """

    def __init__(self, threshold: float, metric: str = "drift/mult_prob_err") -> None:
        if threshold <= 0:
            raise ValueError(f"DriftGuard.threshold must be positive, got {threshold}.")
        if metric not in (*DRIFT_KEYS, "drift/max_abs_logprob"):
            raise ValueError(
                f"DriftGuard.metric {metric!r} is not one of {[*DRIFT_KEYS, 'drift/max_abs_logprob']}."
            )
        self.threshold = threshold
        self.metric = metric

    def check(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Raise `DriftError` when `metrics[self.metric]` exceeds the threshold."""
        value = metrics[self.metric]
        if not value <= self.threshold:  # also catches NaN
            where = f" at step {step}" if step is not None else ""
            raise DriftError(
                f"rollout engine out of sync with the trainer{where}: {self.metric} = {value:.3g} exceeds "
                f"the threshold {self.threshold:.3g} (stale or wrongly mapped weights in the engine; check "
                "the weight refresh, or raise the drift threshold if the dtype explains it)."
            )
