"""vocab_parallel_divergence / divergence_metrics against a float64 full-vocabulary reference written from the
formulas, at TP = 1 (in process, + gradcheck) and TP = 2, 4 (one spawned gloo run each, unequal shards /
Megatron-padded vocabulary), fp32 and bf16 inputs, temperatures != 1, masked positions."""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_distributed
from loss_reference import divergence_metrics, topk_reference_terms

from opsd_megatron.losses import vocab_parallel_divergence
from opsd_megatron.losses.sparse import _VocabParallelLogProbAt

pytestmark = pytest.mark.no_mcore  # never imports megatron: run once (tests/no_mcore.py)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


V = 731  # tiny vocabulary, not divisible by 2, 4 or 8
SHAPE = (2, 5)  # (batch, positions)

CASES = (
    [dict(kind="forward_kl", clip=c) for c in (None, 0.05)]
    + [dict(kind="reverse_kl", clip=c) for c in (None, 0.05)]
    + [dict(kind="jsd", beta=b, clip=c) for b in (0.0, 0.1, 0.5, 0.9, 1.0) for c in (None, 0.02)]
    + [dict(kind="top_k", top_k=k, clip=c) for k in (1, 7) for c in (None, 0.05)]
    + [dict(kind="top_k", top_k=7, beta=b, clip=c) for b, c in ((0.5, None), (0.3, 0.02), (1.0, None))]
    + [dict(kind="top_k_renorm", top_k=7, beta=b, clip=c) for b, c in ((0.0, None), (0.5, None), (0.5, 0.02))]
    + [dict(kind="sampled_token")]
)
DTYPES = (torch.float32, torch.bfloat16)
TEMPERATURES = {torch.float32: 1.1, torch.bfloat16: 0.7}


def make_inputs(dtype: torch.dtype, seed: int = 0):
    """Full-vocabulary logits (B, S, V), mask (B, S), sampled ids (B, S), output-grad weights (B, S)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*SHAPE, V, generator=g) * 3.0).to(dtype)
    t = (s.float() + torch.randn(*SHAPE, V, generator=g) * 2.0).to(dtype)
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[0, :2] = False  # prompt-like masked prefix
    mask[1, -1] = False  # padding-like masked suffix
    ids = torch.randint(0, V, SHAPE, generator=g)
    ids[~mask] = -100  # masked positions may carry ignore-ids
    w = torch.rand(SHAPE, generator=g) + 0.5  # non-uniform incoming gradient
    return s, t, mask, ids, w


def reference(s, t, mask, ids, *, kind, beta=None, temperature=1.0, clip=None, top_k=None):
    """float64 full-vocab per-position loss and d(sum w*loss)/ds via autograd, straight from the formulas."""
    s = s.detach().double().requires_grad_(True)
    ls = torch.log_softmax(s / temperature, -1)
    lt = torch.log_softmax(t.double() / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        terms = pt * (lt - ls)
    elif kind == "reverse_kl":
        terms = ps * (ls - lt)
    elif kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        terms = beta * pt * torch.log(pt / m) + (1 - beta) * ps * torch.log(ps / m)
    elif kind in ("top_k", "top_k_renorm"):  # the reference's top-k script: top_k_renorm, beta = 0.5
        idx = t.double().topk(top_k, -1).indices
        terms = topk_reference_terms(ls, lt, idx, tail=kind == "top_k", beta=beta or 0.0)
    elif kind == "sampled_token":
        y = ids.clamp(min=0).unsqueeze(-1)
        lps, lpt = ls.gather(-1, y), lt.gather(-1, y)
        terms = -(lpt - lps).detach() * lps
    clipped_frac = None
    if clip is not None and kind != "sampled_token":
        clipped_frac = ((terms >= clip).double().sum(-1) * mask).sum() / (mask.sum() * terms.shape[-1])
        terms = terms.clamp(max=clip)
    loss = terms.sum(-1) * mask
    return loss.detach(), torch.autograd.grad((loss * WEIGHTS_FOR(loss)).sum(), s)[0], clipped_frac


def WEIGHTS_FOR(loss):  # noqa: N802 - the weights are part of the inputs; kept deterministic by shape
    return make_inputs(torch.float32)[4].double()


def tolerances(dtype):
    # loss: fp32 math on the same (rounded) inputs; grad: returned in the input dtype
    return (2e-5, 2e-5) if dtype == torch.float32 else (2e-4, 1.5e-2)


def run_cases(shard_bounds, vocab_size, tp_group, dtypes=DTYPES):
    """Compute every case on this rank's shard; returns {(case_idx, dtype_name): (loss, grad shard)}."""
    out = {}
    for dtype in dtypes:
        s_full, t_full, mask, ids, w = make_inputs(dtype)
        lo, hi = shard_bounds
        pad = hi - lo - (min(hi, V) - min(lo, V))
        for i, case in enumerate(CASES):
            s = s_full[..., lo : min(hi, V)]
            t = t_full[..., lo : min(hi, V)]
            if pad:  # Megatron-padded vocabulary: garbage in the padded tail must be ignored
                s = torch.cat([s, torch.full((*SHAPE, pad), 30.0, dtype=dtype)], -1)
                t = torch.cat([t, torch.full((*SHAPE, pad), -30.0, dtype=dtype)], -1)
            s = s.clone().requires_grad_(True)
            loss = vocab_parallel_divergence(
                s, t, temperature=TEMPERATURES[dtype], loss_mask=mask, tp_group=tp_group, target_ids=ids,
                vocab_size=vocab_size, vocab_start_index=lo, **case,
            )  # fmt: skip
            (loss * w).sum().backward()
            assert s.grad.dtype == dtype and loss.dtype == torch.float32
            out[(i, str(dtype))] = (loss.detach(), s.grad[..., : min(hi, V) - lo].float())
            if pad:
                assert torch.all(s.grad[..., min(hi, V) - lo :] == 0)
    s_full, t_full, mask, _, _ = make_inputs(torch.float32)
    lo, hi = shard_bounds
    pad = hi - lo - (min(hi, V) - min(lo, V))
    s = torch.cat([s_full[..., lo : min(hi, V)], torch.zeros(*SHAPE, pad)], -1)
    t = torch.cat([t_full[..., lo : min(hi, V)], torch.zeros(*SHAPE, pad)], -1)
    out["metrics"] = divergence_metrics(
        s, t, kind="forward_kl", temperature=1.1, clip=0.05, loss_mask=mask, tp_group=tp_group,
        vocab_size=vocab_size, vocab_start_index=lo,
    )  # fmt: skip
    return out


def check_against_reference(results_per_rank, bounds, dtypes=DTYPES):
    for dtype in dtypes:
        s, t, mask, ids, _ = make_inputs(dtype)
        tol_loss, tol_grad = tolerances(dtype)
        for i, case in enumerate(CASES):
            ref_loss, ref_grad, frac = reference(s, t, mask, ids, temperature=TEMPERATURES[dtype], **case)
            losses = [r[(i, str(dtype))][0] for r in results_per_rank]
            for lo in losses[1:]:
                assert torch.equal(lo, losses[0]), f"loss differs across ranks for {case}"
            grad = torch.cat([r[(i, str(dtype))][1] for r in results_per_rank], -1)
            assert grad.shape[-1] == V
            where = f"{case} {dtype} shards {bounds}"
            torch.testing.assert_close(losses[0].double(), ref_loss, atol=tol_loss, rtol=tol_loss, msg=where)
            scale = ref_grad.abs().max()
            torch.testing.assert_close(grad.double(), ref_grad, atol=tol_grad * scale, rtol=0, msg=where)
            assert torch.all(losses[0][~mask] == 0) and torch.all(grad[~mask] == 0)
            if frac is not None and not case["kind"].startswith("top_k"):
                assert 0 < frac < 0.5, f"clip {case} should clamp some but not most entries (got {frac})"
    # metrics: forward KL, clip 0.05, temperature 1.1, fp32
    s, t, mask, ids, _ = make_inputs(torch.float32)
    ref_loss, _, frac = reference(s, t, mask, ids, kind="forward_kl", temperature=1.1, clip=0.05)
    met = results_per_rank[0]["metrics"]
    ls = torch.log_softmax(s.double() / 1.1, -1)
    lt = torch.log_softmax(t.double() / 1.1, -1)
    n = mask.sum()
    torch.testing.assert_close(met["divergence"].double(), ref_loss.sum() / n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(met["clipped_fraction"].double(), frac, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        met["student_entropy"].double(), (-(ls.exp() * ls).sum(-1) * mask).sum() / n, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        met["teacher_entropy"].double(), (-(lt.exp() * lt).sum(-1) * mask).sum() / n, atol=1e-5, rtol=1e-5
    )


def _dist_worker(rank, world_size, bounds, vocab_size, dtypes):
    """One spawned run per TP size covers the unfused cases, metrics and the fused cases."""
    from test_losses_fused import run_fused_cases

    torch.distributed.init_process_group("gloo")
    group = torch.distributed.new_group(list(range(world_size)))  # an explicit TP group
    unfused = run_cases(bounds[rank], vocab_size, tp_group=None, dtypes=dtypes)  # None = the world group
    return unfused, run_fused_cases(bounds[rank], vocab_size, tp_group=group)


def test_tp1_matches_reference():
    check_against_reference([run_cases((0, V), None, None)], [(0, V)])


def test_tp1_phased_path_matches_reference(monkeypatch):
    """The chunked phases (the CUDA path, eager here) give the same results as the CPU single pass."""
    monkeypatch.setenv("OPSD_LOSS_FORCE_PHASES", "1")
    check_against_reference([run_cases((0, V), None, None)], [(0, V)])


def test_tp2_unequal_shards():
    from test_losses_fused import check_fused

    bounds = [(0, 366), (366, V)]
    results = run_distributed(_dist_worker, 2, bounds, None, DTYPES)
    check_against_reference([r[0] for r in results], bounds)
    check_fused([r[1] for r in results])


def test_tp4_megatron_padded_vocab():
    from test_losses_fused import check_fused

    part = 184  # 731 padded to 736 = 4 * 184; the last shard holds 179 real entries + 5 padding
    bounds = [(r * part, (r + 1) * part) for r in range(4)]
    results = run_distributed(_dist_worker, 4, bounds, V, (torch.float32,))  # bf16: TP 1 and 2 (CI time)
    check_against_reference([r[0] for r in results], bounds, (torch.float32,))
    check_fused([r[1] for r in results])


@pytest.mark.parametrize(
    "case",
    [
        dict(kind="forward_kl", clip=None),
        dict(kind="forward_kl", clip=0.03),
        dict(kind="reverse_kl", clip=None),
        dict(kind="reverse_kl", clip=0.03),
        dict(kind="jsd", beta=0.3, clip=None),
        dict(kind="jsd", beta=0.7, clip=0.01),
        dict(kind="top_k", top_k=3, clip=0.05),
        dict(kind="top_k", top_k=3, beta=0.5, clip=None),
        dict(kind="top_k_renorm", top_k=5, beta=0.5, clip=0.02),
        dict(kind="log_prob_at"),
        dict(
            kind="log_prob_at_tail"
        ),  # the primitive under sampled_token (whose value is not its gradient's)
    ],
    ids=lambda c: "-".join(f"{v}" for v in c.values()),
)
def test_gradcheck_float64(case):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(3, 40, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = s.detach() + torch.randn(3, 40, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    ids = torch.tensor([4, -100, 17])

    def fn(x):
        if case["kind"] == "log_prob_at":
            ids2 = torch.tensor([[4, 39], [0, 1], [17, 17]])
            return _VocabParallelLogProbAt.apply(x, t, ids2, 1.3, 0, 40, None)[0]
        if case["kind"] == "log_prob_at_tail":  # distinct ids per row, as the top-k gives
            ids2 = torch.tensor([[4, 39], [0, 1], [17, 3]])
            return _VocabParallelLogProbAt.apply(x, t, ids2, 1.3, 0, 40, None, True)[0]
        return vocab_parallel_divergence(x, t, temperature=1.3, loss_mask=mask, target_ids=ids, **case)

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_topk_tail_is_exact_when_the_topk_mass_is_near_one():
    """The tail bucket's log-mass is a log-sum-exp over the entries outside the top-k: in fp32 it matches
    float64 to ~1e-6 relative even when 1 - (top-k mass) is ~1e-13 (where fp32 1 - sum p is exactly 0), and
    its gradient is the float64 one (it used to vanish there)."""
    g = torch.Generator().manual_seed(3)
    v, k = 64, 4
    s = torch.randn(5, v, generator=g)
    s[:, :k] += 30.0  # top-k mass 1 - ~1e-12
    t = s + 0.3 * torch.randn(5, v, generator=g)
    ids = torch.arange(k).expand(5, k)
    x = s.clone().requires_grad_(True)
    lps, lpt = _VocabParallelLogProbAt.apply(x, t, ids, 1.0, 0, v, None, True)
    assert float(1.0 - lps[:, :k].exp().sum(-1).max()) == 0.0  # the old formula's cancellation, in fp32
    xd = s.double().requires_grad_(True)
    ref = {}
    for name, z in (("s", xd), ("t", t.double())):
        lp = torch.log_softmax(z, -1)
        ref[name] = torch.logsumexp(lp[:, k:], -1)
    torch.testing.assert_close(lps[:, -1].double(), ref["s"].detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(lpt[:, -1].double(), ref["t"], rtol=1e-5, atol=0)
    assert float(ref["s"].max()) < -20  # the tail really is tiny
    lps[:, -1].sum().backward()
    (gd,) = torch.autograd.grad(ref["s"].sum(), xd)
    torch.testing.assert_close(x.grad.double(), gd, atol=1e-5, rtol=0)
    assert float(x.grad[:, k:].abs().max()) > 1e-3  # the tail gradient does not vanish
    # the loss: JSD(0.5) over the k + tail buckets, fp32 against the float64 definition
    loss = vocab_parallel_divergence(s, t, kind="top_k", top_k=k, beta=0.5)
    ref_terms = topk_reference_terms(
        torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1), ids, tail=True, beta=0.5
    )
    torch.testing.assert_close(loss.double(), ref_terms.sum(-1), rtol=1e-4, atol=1e-7)


def test_topk_beta_zero_is_forward_kl_and_jsd_needs_beta():
    """kind=top_k without beta is forward KL over the buckets (as before); kind=jsd without beta: refused."""
    s, t, mask, ids, _ = make_inputs(torch.float32)
    a = vocab_parallel_divergence(s, t, kind="top_k", top_k=7, loss_mask=mask)
    b = vocab_parallel_divergence(s, t, kind="top_k", top_k=7, beta=0.0, loss_mask=mask)
    c = vocab_parallel_divergence(s, t, kind="top_k", top_k=7, beta=0.5, loss_mask=mask)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="kind='jsd' needs beta"):
        vocab_parallel_divergence(s, t, kind="jsd")


def test_user_errors_are_one_sentence():
    s = torch.randn(2, 8)
    with pytest.raises(ValueError, match="kind must be one of"):
        vocab_parallel_divergence(s, s, kind="kl")
    with pytest.raises(ValueError, match="needs top_k"):
        vocab_parallel_divergence(s, s, kind="top_k")
    with pytest.raises(ValueError, match="needs target_ids"):
        vocab_parallel_divergence(s, s, kind="sampled_token")
    with pytest.raises(ValueError, match="loss_mask must have shape"):
        vocab_parallel_divergence(s, s, loss_mask=torch.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_divergence(s, torch.randn(2, 9))
    with pytest.raises(ValueError, match="beta must lie"):
        vocab_parallel_divergence(s, s, kind="jsd", beta=1.5)
    assert math.isfinite(vocab_parallel_divergence(s, s).sum().item())
