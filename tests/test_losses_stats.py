"""One pass gives everything the step reports: `fused_linear_divergence(..., with_stats=True)` returns the
same clipped fraction and entropies as `divergence_metrics`, and the same sampled-token log-probabilities as
`vocab_parallel_token_logprobs` (the engines' processed logprobs), on materialised logits; every kind,
padded vocabulary shard; the renormalised top-k variant against a plain formula (fp32)."""

from __future__ import annotations

import pytest
import torch
from loss_reference import divergence_metrics

from opsd_megatron.losses import fused_linear_divergence, vocab_parallel_divergence
from opsd_megatron.losses.token_logprobs import vocab_parallel_token_logprobs
from opsd_megatron.rollout.base import SamplingConfig

V, V_PAD, T, H = 301, 320, 13, 16
SAMPLING = SamplingConfig(temperature=1.1, top_p=0.9, top_k=20)


def _inputs():
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(T, H, generator=g)
    ht = hs + 0.4 * torch.randn(T, H, generator=g)
    ws = torch.randn(V_PAD, H, generator=g) * 0.7
    wt = ws + 0.2 * torch.randn(V_PAD, H, generator=g)
    mask = torch.ones(T, dtype=torch.bool)
    mask[[0, 5, 12]] = False
    ids = torch.randint(0, V, (T,), generator=g)
    return hs, ht, ws, wt, mask, ids


@pytest.mark.parametrize(
    "case",
    [dict(kind="forward_kl", clip=0.02), dict(kind="jsd", beta=0.3, clip=None),
     dict(kind="reverse_kl", clip=0.05),
     dict(kind="top_k", top_k=5, clip=0.05), dict(kind="top_k_renorm", top_k=5, clip=None),
     dict(kind="sampled_token")],
    ids=lambda c: c["kind"],
)  # fmt: skip
def test_stats_equal_the_materialised_metrics(case):
    torch.set_num_threads(1)
    hs, ht, ws, wt, mask, ids = _inputs()
    kw = dict(temperature=1.1, loss_mask=mask, target_ids=ids, vocab_size=V, **case)
    loss, st = fused_linear_divergence(
        hs, ws, ht, wt, chunk_size=4, with_stats=True, sampling=SAMPLING, **kw
    )  # fmt: skip
    ls, lt = hs @ ws.t(), ht @ wt.t()
    ref_loss = vocab_parallel_divergence(ls, lt, **kw)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    met = divergence_metrics(ls, lt, **kw)
    n = mask.sum()
    torch.testing.assert_close(loss.sum() / n, met["divergence"], atol=1e-6, rtol=1e-6)
    for key in ("clipped_fraction", "student_entropy", "teacher_entropy"):
        torch.testing.assert_close(getattr(st, key).sum() / n, met[key], atol=1e-6, rtol=1e-6, msg=key)
        assert torch.all(getattr(st, key)[~mask] == 0)
    lp = vocab_parallel_token_logprobs(ls, ids, SAMPLING, vocab_size=V)
    torch.testing.assert_close(st.token_logprobs[mask], lp[mask], atol=1e-6, rtol=1e-6)
    assert torch.all(st.token_logprobs[~mask] == 0)
    if case.get("clip") == 0.02:
        assert st.clipped_fraction.sum() > 0  # the clip statistic is exercised


def test_renormalised_topk_formula():
    g = torch.Generator().manual_seed(1)
    ls, lt = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    got = vocab_parallel_divergence(ls, lt, kind="top_k_renorm", top_k=7, temperature=1.3)
    idx = lt.topk(7, dim=-1).indices
    q_s = torch.log_softmax(ls.gather(1, idx) / 1.3, -1)
    q_t = torch.log_softmax(lt.gather(1, idx) / 1.3, -1)
    torch.testing.assert_close(got, (q_t.exp() * (q_t - q_s)).sum(-1), atol=1e-6, rtol=1e-6)
