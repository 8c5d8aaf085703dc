"""Rollout-vs-trainer drift: are the engine's weights the trainer's weights?

After a refresh, the next rollout's sampled-token logprobs (from the engine) are compared with the trainer's
logprobs of the same tokens under the same sampling distribution:

    lp_trainer = vocab_parallel_token_logprobs(logits, response_ids, sampling, vocab_size=hf_vocab)  # [b, s]
    metrics = compute_drift(lp_engine, lp_trainer, mask)   # {"drift/mean_abs_logprob", ...median..., ...}
    DriftGuard(threshold=0.1).check(metrics, step=step)     # raises DriftError when out of sync

Mean or median: a correct refresh leaves every token within round-off (fp32 ~1e-7, bf16 ~1e-2 nats), but in
bf16 a token at the edge of the nucleus (top_p / top_k) can fall inside it for the engine and outside it for
the trainer: one such flip counts 30 nats (the clamp), so one flip in 300 tokens lifts the mean by 0.1, the
default threshold, with the weights in sync. A broken refresh (stale, wrongly mapped or scaled weights) moves
most tokens. So the guard judges the median (`drift/median_abs_logprob`: more than half of the tokens off by
more than the threshold), and the mean stays reported (it sees a rare large error the median ignores).
The median comes from a histogram of |Δ| (`DRIFT_BIN_EDGES`, 8 bins a decade from 1e-9 to 30 nats) whose
counts are summed like every other metric (one all-reduce of `len(DRIFT_BIN_KEYS)` numbers): the bin holding
the median is exact, the value inside it interpolated geometrically (within a factor 10^(1/8) = 1.33).

`vocab_parallel_token_logprobs` (`opsd_megatron.losses.token_logprobs`, shared with the fused loss's step
statistics) reproduces the engines' logprob semantics for vocabulary-parallel, padded logits.
Collectives: `compute_drift` with a `group`: one all-reduce SUM `[3]` and one all-reduce MAX (0-dim).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DRIFT_KEYS = ("drift/mean_abs_logprob", "drift/mult_prob_err", "drift/median_abs_logprob")
DRIFT_CLAMP = 30.0
"""Largest |Δ| counted (nats): a token outside the trainer's nucleus has logprob -inf there."""
DRIFT_BIN_EDGES = torch.tensor([10.0 ** (k / 8) for k in range(-72, 12)] + [DRIFT_CLAMP], dtype=torch.float64)
"""Upper edges of the |Δ| histogram's bins (nats): [0, 1e-9], then 8 a decade, the last up to the clamp."""
DRIFT_BIN_KEYS = tuple(f"drift_bin_{i:02d}" for i in range(len(DRIFT_BIN_EDGES)))
"""Sum keys of the histogram's counts (`step.opsd.SUM_KEYS`), bin i = (edge i-1, edge i]."""


def drift_bins(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Counts [len(DRIFT_BIN_EDGES)] float64 of `delta` (|Δ| >= 0, clamped at `DRIFT_CLAMP`) where `keep`, on
    `delta`'s device: a scatter-add, no boolean indexing and no copy to the host (no device sync inside the
    training step's loss function)."""
    idx = torch.bucketize(delta.double().clamp(max=DRIFT_CLAMP), DRIFT_BIN_EDGES.to(delta.device))
    counts = torch.zeros(len(DRIFT_BIN_EDGES), dtype=torch.float64, device=delta.device)
    return counts.scatter_add_(0, idx.reshape(-1), keep.reshape(-1).double())


def bins_quantile(counts: list[float], q: float = 0.5) -> float:
    """The `q` quantile of a `drift_bins` histogram (0.0 when empty): its bin found exactly, the value
    interpolated inside it (geometrically; linearly in the first bin [0, 1e-9])."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    target, below = q * total, 0.0
    for i, c in enumerate(counts):
        if c > 0 and below + c >= target:
            frac = (target - below) / c
            hi = float(DRIFT_BIN_EDGES[i])
            if i == 0:
                return hi * frac
            lo = float(DRIFT_BIN_EDGES[i - 1])
            return lo * (hi / lo) ** frac
        below += c
    return float(DRIFT_BIN_EDGES[-1])


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
            |Δ| is clamped at `DRIFT_CLAMP` (as the training step's metric: -inf on one side counts 30).
        group: when given, sums are all-reduced over it (e.g. the data-parallel group) so every rank gets the
            global means. Collective: one all-reduce SUM of 3 + len(DRIFT_BIN_KEYS) numbers, one MAX.
    Returns:
        {"drift/mean_abs_logprob": mean |Δ|, "drift/mult_prob_err": mean(exp(|Δ|) - 1),
        "drift/median_abs_logprob": median |Δ| (`bins_quantile`), "drift/max_abs_logprob": max |Δ|}
        (zeros when no position is selected).
    """
    if engine_logprobs.shape != trainer_logprobs.shape:
        raise ValueError(
            f"compute_drift: engine_logprobs has shape {tuple(engine_logprobs.shape)} but "
            f"trainer_logprobs has {tuple(trainer_logprobs.shape)}; they must match."
        )
    delta = (engine_logprobs.double() - trainer_logprobs.double()).abs().clamp(max=DRIFT_CLAMP)  # [b, s]
    if mask is None:
        mask = torch.ones_like(delta, dtype=torch.bool)
    elif mask.shape != delta.shape:
        raise ValueError(f"compute_drift: mask has shape {tuple(mask.shape)}, expected {tuple(delta.shape)}.")
    mask = mask.bool()
    delta = torch.where(mask, delta, torch.zeros_like(delta))
    sums = torch.cat([torch.stack([delta.sum(), torch.expm1(delta).sum(), mask.sum().double()]),
                      drift_bins(delta, mask)])  # [3 + bins]  # fmt: skip
    dmax = delta.max() if delta.numel() else torch.zeros((), dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(dmax, op=dist.ReduceOp.MAX, group=group)
    count = max(sums[2].item(), 1.0)
    return {
        "drift/mean_abs_logprob": sums[0].item() / count,
        "drift/mult_prob_err": sums[1].item() / count,
        "drift/median_abs_logprob": bins_quantile(sums[3:].tolist()),
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
