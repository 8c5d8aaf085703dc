"""fused_linear_divergence equals vocab_parallel_divergence on `hidden @ weight.T` (fp32 tolerance):
loss, d/d hidden, d/d weight shard; token-mean (uniform) and per-token-weighted incoming gradients (both
backward paths); chunking; masked tokens; teacher weight = student weight; TP = 2, 4 run inside
test_losses.py's spawned runs."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.losses import fused_linear_divergence, token_mean, vocab_parallel_divergence
from opsd_megatron.losses._phases import default_chunk_size

pytestmark = pytest.mark.no_mcore  # never imports megatron: run once (tests/no_mcore.py)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


V, T, H = 731, 14, 24
FUSED_CASES = [
    dict(kind="forward_kl", clip=None),
    dict(kind="forward_kl", clip=0.05),
    dict(kind="reverse_kl", clip=0.05),
    dict(kind="jsd", beta=0.5, clip=0.02),
    dict(kind="top_k", top_k=4, clip=None),
    dict(kind="top_k_renorm", top_k=4, beta=0.5, clip=None),  # the OPSD reference's top-k script
    dict(kind="sampled_token"),
]
MODES = ("uniform", "weighted")


def make_fused_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(T, H, generator=g)
    ht = hs + 0.5 * torch.randn(T, H, generator=g)
    ws = torch.randn(V, H, generator=g) * 0.6
    wt = ws + 0.3 * torch.randn(V, H, generator=g)
    mask = torch.ones(T, dtype=torch.bool)
    mask[[0, 1, 6, 13]] = False
    ids = torch.randint(0, V, (T,), generator=g)
    go = {"uniform": torch.full((T,), 1.0 / mask.sum().item()), "weighted": torch.rand(T, generator=g) + 0.2}
    return [x.to(dtype) for x in (hs, ht, ws, wt)] + [mask, ids, go]


def run_fused_cases(bounds, vocab_size, tp_group, same_weight=False):
    """Fused loss/grads on this rank's weight shard rows [lo, hi) (rows >= V are padding)."""
    hs0, ht0, ws0, wt0, mask, ids, go = make_fused_inputs()
    lo, hi = bounds
    pad = hi - lo - (min(hi, V) - min(lo, V))
    ws_sh = torch.cat([ws0[lo : min(hi, V)], torch.randn(pad, H) * 5])
    wt_sh = ws_sh if same_weight else torch.cat([wt0[lo : min(hi, V)], torch.randn(pad, H) * 5])
    out = {}
    for i, case in enumerate(FUSED_CASES):
        for mode in MODES:
            hs = hs0.clone().requires_grad_(True)
            ws = ws_sh.clone().requires_grad_(True)
            wt = ws if same_weight else wt_sh
            loss = fused_linear_divergence(
                hs, ws, hs0 if same_weight else ht0, wt, temperature=1.1, loss_mask=mask, tp_group=tp_group,
                target_ids=ids, vocab_size=vocab_size, vocab_start_index=lo, chunk_size=4, **case,
            )  # fmt: skip
            (loss * go[mode]).sum().backward()
            out[(i, mode)] = (loss.detach(), hs.grad.clone(), ws.grad[: min(hi, V) - lo].clone())
            if pad:
                assert torch.all(ws.grad[min(hi, V) - lo :] == 0)
    return out


def fused_reference(same_weight=False):
    """Unfused TP=1 results on the full-vocab logits, via autograd through vocab_parallel_divergence."""
    hs0, ht0, ws0, wt0, mask, ids, go = make_fused_inputs()
    ref = {}
    for i, case in enumerate(FUSED_CASES):
        for mode in MODES:
            hs = hs0.clone().requires_grad_(True)
            ws = ws0.clone().requires_grad_(True)
            lt = (hs0 @ ws0.t()) if same_weight else (ht0 @ wt0.t())
            loss = vocab_parallel_divergence(
                hs @ ws.t(), lt, temperature=1.1, loss_mask=mask, target_ids=ids, tp_group=None, **case
            )
            (loss * go[mode]).sum().backward()
            ref[(i, mode)] = (loss.detach(), hs.grad, ws.grad)
    return ref


def check_fused(results_per_rank, same_weight=False):
    ref = fused_reference(same_weight)
    for key, (r_loss, r_gh, r_gw) in ref.items():
        where = f"{FUSED_CASES[key[0]]} {key[1]}"
        for res in results_per_rank:
            torch.testing.assert_close(res[key][0], r_loss, atol=1e-5, rtol=1e-5, msg=where)
            torch.testing.assert_close(res[key][1], r_gh, atol=1e-5, rtol=1e-4, msg=where)
        gw = torch.cat([res[key][2] for res in results_per_rank])
        torch.testing.assert_close(gw, r_gw, atol=1e-5, rtol=1e-4, msg=where)


@pytest.mark.parametrize("same_weight", [False, True], ids=["frozen-teacher-weight", "shared-weight"])
def test_fused_equals_unfused_tp1(same_weight):
    check_fused([run_fused_cases((0, V), None, None, same_weight)], same_weight)


def test_fused_bf16_matches_unfused_bf16():
    hs, ht, ws, wt, mask, _, go = make_fused_inputs(torch.bfloat16)
    kw = dict(kind="forward_kl", temperature=1.1, clip=0.05, loss_mask=mask)
    a = [x.clone().requires_grad_(True) for x in (hs, ws)]
    b = [x.clone().requires_grad_(True) for x in (hs, ws)]
    loss_f = fused_linear_divergence(a[0], a[1], ht, wt, chunk_size=5, **kw)
    loss_u = vocab_parallel_divergence(b[0] @ b[1].t(), ht @ wt.t(), **kw)
    token_mean(loss_f, mask, mask.sum()).backward()
    token_mean(loss_u, mask, mask.sum()).backward()
    torch.testing.assert_close(loss_f, loss_u, atol=1e-5, rtol=1e-5)  # same bf16 logits, fp32 math
    for x, y in zip(a, b):
        assert x.grad.dtype == torch.bfloat16
        torch.testing.assert_close(x.grad.float(), y.grad.float(), atol=2e-2 * y.grad.abs().max(), rtol=0)


def test_fused_no_grad_and_errors():
    hs, ht, ws, wt, mask, _, _ = make_fused_inputs()
    with torch.no_grad():
        loss = fused_linear_divergence(hs, ws, ht, wt, loss_mask=mask, chunk_size=3)
    assert loss.shape == (T,) and torch.all(loss[~mask] == 0) and torch.all(loss[mask] > 0)
    with pytest.raises(ValueError, match="must both be \\[vocab/tp, 24\\]"):
        fused_linear_divergence(hs, ws[:, :5], ht, wt)
    with pytest.raises(ValueError, match="must both be \\[tokens, hidden\\]"):
        fused_linear_divergence(hs[None], ws, ht[None], wt)
    assert default_chunk_size(151_936, 8192, cuda=True) == 1639  # 5 even chunks, ~1 GB of bf16 logits
    assert default_chunk_size(100, 10, cuda=False) == 10


def test_fused_second_backward_recomputes():
    """The token-mean fast path scales saved gradients in place; a retained second backward still matches."""
    hs, ht, ws, wt, mask, _, _ = make_fused_inputs()
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    loss = token_mean(fused_linear_divergence(hs, ws, ht, wt, loss_mask=mask, clip=0.05), mask, 10)
    loss.backward(retain_graph=True)
    first = (hs.grad.clone(), ws.grad.clone())
    hs.grad = ws.grad = None
    loss.backward()
    torch.testing.assert_close(hs.grad, first[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ws.grad, first[1], atol=1e-6, rtol=1e-5)
