"""`loss.behaviour_correction: truncated` and the off-policy statistics (losses/behaviour.py) on CPU.

The weighted loss Σ_i min(π_θ/μ, cap)_i ℓ_i from the fused LM-head loss is checked against a float64
reference in plain torch (logits, softmax, forward KL per token, the same constant weights): loss and the
gradients of the student hidden states and LM head agree to fp32 round-off (the fused loss computes in
fp32), and the weight carries no gradient of its own. And the trainer refuses a rollout batch whose version
tag is staler than `rollout.max_staleness` (one clear error).
"""

from __future__ import annotations

import math

import torch

from opsd_megatron.losses import fused_linear_divergence
from opsd_megatron.losses.behaviour import offpolicy_sums, truncated_weight
from opsd_megatron.rollout.base import SamplingConfig


def test_offpolicy_sums_and_weight():
    trainer = torch.log(torch.tensor([0.5, 0.4, 0.9, 0.1], dtype=torch.float64))
    behaviour = torch.log(torch.tensor([0.5, 0.1, 0.3, 0.4], dtype=torch.float64))  # ratios 1, 4, 3, 0.25
    mask = torch.tensor([1, 1, 0, 1])
    s = offpolicy_sums(trainer, behaviour, mask)
    assert math.isclose(s["ratio_sum"].item(), 1 + 4 + 0.25)
    assert s["ratio_gt2"].item() == 1.0 and math.isclose(s["ratio_max"].item(), 4.0)  # masked 3 ignored
    w = truncated_weight(trainer.requires_grad_(), behaviour, cap=2.0)
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 2.0, 0.25], dtype=torch.float64))
    assert not w.requires_grad  # a constant: no gradient through the ratio


def _reference(hs, w_s, ht, w_t, weights, mask, temperature):
    """float64: Σ_i weights_i · KL(p_T,i || p_S,i) over masked tokens (forward KL at `temperature`)."""
    ls = torch.log_softmax(hs @ w_s.T / temperature, -1)
    lt = torch.log_softmax(ht @ w_t.T / temperature, -1)
    per_tok = (lt.exp() * (lt - ls)).sum(-1) * mask
    return (per_tok * weights).sum()


def test_truncated_correction_scales_each_tokens_gradient():
    g = torch.Generator().manual_seed(0)
    n, h, v, t = 6, 8, 11, 1.1
    hs = torch.randn(n, h, generator=g, dtype=torch.float64)
    w_s = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    ht = torch.randn(n, h, generator=g, dtype=torch.float64)
    w_t = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    ids = torch.randint(0, v, (n,), generator=g)
    mask = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.float64)
    sampling = SamplingConfig(temperature=t, top_p=1.0, top_k=-1)

    hs32, ws32 = hs.float().requires_grad_(), w_s.float().requires_grad_()
    per_tok, st = fused_linear_divergence(
        hs32, ws32, ht.float(), w_t.float(), kind="forward_kl", temperature=t, loss_mask=mask.float(),
        target_ids=ids, vocab_size=v, with_stats=True, sampling=sampling,
    )  # fmt: skip
    offsets = torch.tensor([0.0, -math.log(3), math.log(2), 0.0, -math.log(1.5), 5.0])  # log μ - log π_θ
    behaviour = st.token_logprobs.detach() + offsets.float()
    weights = truncated_weight(st.token_logprobs, behaviour, cap=2.0)  # [1, 2 (3 capped), .5, 1, 1.5, e^-5]
    expected = torch.tensor([1, 2, 0.5, 1, 1.5, math.exp(-5)], dtype=torch.float64)
    assert torch.allclose(weights.double(), expected, rtol=1e-5)
    (per_tok * weights).sum().backward()

    hs64, ws64 = hs.clone().requires_grad_(), w_s.clone().requires_grad_()
    ref = _reference(hs64, ws64, ht, w_t, weights.double(), mask, t)
    ref.backward()
    assert math.isclose((per_tok * weights).sum().item(), ref.item(), rel_tol=1e-5)
    assert torch.allclose(hs32.grad.double(), hs64.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ws32.grad.double(), ws64.grad, rtol=1e-4, atol=1e-6)
    # and it differs from the uncorrected gradient (the weights are not all 1)
    hs64.grad = None
    _reference(hs64, w_s, ht, w_t, torch.ones(n, dtype=torch.float64), mask, t).backward()
    assert not torch.allclose(hs32.grad.double(), hs64.grad, rtol=1e-3)


def test_a_batch_staler_than_allowed_is_refused(tmp_path):
    """`RemoteCollector` checks every batch's version tag (here a batch of version 0 held for step 2)."""
    from types import SimpleNamespace

    import pytest

    from opsd_megatron.config import config_from_dict
    from opsd_megatron.data import Problem, PromptSampler
    from opsd_megatron.rollout.remote import RemoteCollector, RolloutBatch, StaleRolloutError

    sections = {"model": {"path": str(tmp_path)}, "data": {"path": "builtin:tiny_math"},
                "rollout": {"placement": "separate", "max_staleness": 1},
                "train": {"steps": 3, "global_batch_size": 2, "micro_batch_size": 1}}  # fmt: skip
    cfg = config_from_dict(sections)
    ps = SimpleNamespace(world_size=1, rank=0, dp_rank=0, cpu_group=None)
    problems = [Problem(problem=f"p{i}", solution="s", answer=None, row=i) for i in range(4)]
    prompts = lambda i: ([1, 2], [1, 2, 3])  # noqa: E731 - token ids of any problem
    col = RemoteCollector(cfg, ps, 1, PromptSampler(4, 2, 0), prompts, problems, None, chunks=[], syncer=None,
                          link=None, ckpt_root=tmp_path)  # fmt: skip
    rows = [([5, 6], [-0.1, -0.2], "stop")] * 2
    col.held = RolloutBatch(step=2, version=0, rows=rows, correct=[None, None])
    with pytest.raises(StaleRolloutError, match="weight version 0, 2 steps old; rollout.max_staleness=1"):
        col.collect(None, 2)
    col.held = RolloutBatch(step=2, version=1, rows=rows, correct=[None, None])
    samples, _ = col.collect(None, 2)
    assert len(samples) == 2 and col.step_metrics["rollout/staleness"] == 1.0
