"""Bucketing, peak memory of a refresh, and the drift metrics/guard/vocab-parallel logprob helper (no vLLM).

The Megatron → vLLM integration (TP2, PP2, two colocated engines) is in test_refresh_megatron.py.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from opsd_megatron.losses.token_logprobs import vocab_parallel_token_logprobs
from opsd_megatron.rollout import SamplingConfig, make_engine
from opsd_megatron.rollout.refresh import (
    DriftError,
    DriftGuard,
    WeightSyncer,
    compute_drift,
    iter_buckets,
    layer_group,
)
from opsd_megatron.rollout.sampling import process_logits


def _named(n_layers=4, width=64):
    out = [("model.embed_tokens.weight", torch.zeros(100, width))]
    for i in range(n_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"model.layers.{i}.self_attn.{proj}.weight", torch.zeros(width, width)))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out.append((f"model.layers.{i}.mlp.{proj}.weight", torch.zeros(width, width)))
    out.append(("model.norm.weight", torch.zeros(width)))
    return out


def test_layer_group_and_buckets_never_split_a_layer():
    assert layer_group("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_group("model.norm.weight") == "model.norm.weight"
    named = _named()
    layer_bytes = 7 * 64 * 64 * 4
    for bucket_bytes in (1, layer_bytes // 2, layer_bytes, 2 * layer_bytes + 1, 1 << 30):
        buckets = list(iter_buckets(iter(named), bucket_bytes))
        assert [n for b in buckets for n, _ in b] == [n for n, _ in named]  # order kept, nothing lost
        seen_groups = set()
        for b in buckets:
            groups = {layer_group(n) for n, _ in b}
            assert not groups & seen_groups  # a group lives in exactly one bucket
            seen_groups |= groups
            size = sum(t.numel() * t.element_size() for _, t in b)
            assert size <= bucket_bytes + layer_bytes  # at most one group beyond the limit
    assert len(list(iter_buckets(iter(named), 1 << 30))) == 1
    assert len(list(iter_buckets(iter(named), layer_bytes))) == 5  # embed+L0, L1, L2, L3, norm
    half = list(iter_buckets(iter(named), 1 << 30, dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for _, t in half[0])
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(iter(named), 0))


def test_refresh_peak_memory_scales_with_bucket_not_model(tiny_qwen3_dir):
    """Live streamed bytes (tracked with weakref finalizers) peak at ~one bucket, not the model."""
    engine = make_engine("hf", tiny_qwen3_dir, dtype="float32")
    source = [(n, p.detach().clone() + 0.01) for n, p in engine.model.named_parameters()]
    model_bytes = sum(t.numel() * t.element_size() for _, t in source)
    largest_group = max(
        sum(t.numel() * t.element_size() for n, t in source if layer_group(n) == g)
        for g in {layer_group(n) for n, _ in source}
    )
    largest_tensor = max(t.numel() * t.element_size() for _, t in source)

    def measure(bucket_bytes):
        live = {"now": 0, "peak": 0}

        def release(nbytes):
            live["now"] -= nbytes

        def stream():  # like export_hf_weights: every tensor is freshly materialised
            for name, t in source:
                fresh = t.clone()
                nbytes = fresh.numel() * fresh.element_size()
                live["now"] += nbytes
                live["peak"] = max(live["peak"], live["now"])
                weakref.finalize(fresh, release, nbytes)
                yield name, fresh

        syncer = WeightSyncer(engine, bucket_bytes=bucket_bytes, export_fn=lambda chunks: stream())
        stats = syncer.sync(None)
        assert stats.bytes == model_bytes and stats.tensors == len(source)
        assert live["now"] <= largest_tensor  # everything released after the refresh (but a last reference)
        return live["peak"], stats

    small_peak, small = measure(largest_group)
    big_peak, big = measure(1 << 40)
    assert big.buckets == 1 and big_peak >= model_bytes
    assert small.buckets >= 4 and small.max_bucket_bytes <= 2 * largest_group
    assert small_peak <= 2 * largest_group + 2 * largest_tensor
    assert small_peak < 0.5 * model_bytes
    # and the engine got the new weights
    for name, t in source:
        torch.testing.assert_close(dict(engine.model.named_parameters())[name], t)
    m = small.metrics()
    assert m["refresh/bytes"] == model_bytes and m["refresh/seconds"] > 0


def test_compute_drift_and_guard():
    a = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
    b = a + torch.tensor([[0.1, -0.1, 5.0], [0.0, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    d = compute_drift(a, b, mask)
    assert d["drift/mean_abs_logprob"] == pytest.approx(0.4 / 4)
    assert d["drift/mult_prob_err"] == pytest.approx(
        (2 * torch.expm1(torch.tensor(0.1)) + torch.expm1(torch.tensor(0.2))).item() / 4
    )
    assert d["drift/max_abs_logprob"] == pytest.approx(0.2)
    DriftGuard(0.2).check(d)
    with pytest.raises(DriftError, match=r"drift/mult_prob_err = .* exceeds the threshold 0.01"):
        DriftGuard(0.01).check(d, step=4)
    with pytest.raises(DriftError):
        DriftGuard(0.01).check({"drift/mult_prob_err": float("nan")})
    with pytest.raises(ValueError, match="trainer_logprobs has"):
        compute_drift(a, b[:, :2])
    with pytest.raises(ValueError, match="DriftGuard.metric"):
        DriftGuard(0.1, metric="drift/unknown")


def test_drift_median_ignores_rare_flips_and_sees_a_broken_refresh():
    """The guard's median (a histogram of |Δ|, `drift_bins`): 1 % of tokens flipped out of the nucleus (30
    nats each) lift the mean to 0.3 nats, over the default threshold 0.1, while the median stays at the
    round-off; a refresh that moves every token trips it; it matches the exact median within one bin
    (a factor 10^(1/8)) on log-uniform data."""
    from opsd_megatron.rollout.refresh.drift import DRIFT_BIN_EDGES, bins_quantile, drift_bins

    g = torch.Generator().manual_seed(0)
    trainer = -torch.rand(1, 1000, generator=g, dtype=torch.float64) * 5
    noise = torch.exp(torch.empty(1, 1000, dtype=torch.float64).uniform_(-18, -12, generator=g))  # ~1e-7
    engine = trainer + noise
    engine[0, ::100] = float("-inf")  # 10 nucleus flips: -inf for the engine, clamped at 30 nats
    d = compute_drift(engine, trainer)
    assert d["drift/mean_abs_logprob"] > 0.29 and d["drift/max_abs_logprob"] == 30.0, d
    exact = noise[0].sort().values[494].item()  # the median of the 990 unflipped + 10 at 30 nats
    assert exact / 1.34 <= d["drift/median_abs_logprob"] <= exact * 1.34, (d, exact)
    DriftGuard(0.1, "drift/median_abs_logprob").check(d)  # in sync: passes
    with pytest.raises(DriftError, match="mean_abs_logprob = 0.3"):
        DriftGuard(0.1, "drift/mean_abs_logprob").check(d)
    broken = compute_drift(trainer * 0.9, trainer)  # weights off: every token moves (up to 0.5 nats)
    with pytest.raises(DriftError, match="median_abs_logprob"):
        DriftGuard(0.1, "drift/median_abs_logprob").check(broken, step=2)
    for lo, hi in ((-20.0, 3.0), (-3.0, -1.0)):  # log-uniform |Δ| from 2e-9 to 20 nats; a narrow range
        delta = torch.exp(torch.empty(4001, dtype=torch.float64).uniform_(lo, hi, generator=g))
        counts = drift_bins(delta, torch.ones_like(delta, dtype=torch.bool))
        assert counts.sum() == 4001 and len(counts) == len(DRIFT_BIN_EDGES)
        for q in (0.1, 0.5, 0.9):
            want = delta.quantile(q).item()
            assert want / 1.34 <= bins_quantile(counts.tolist(), q) <= want * 1.34, (q, want)
    assert bins_quantile([0.0] * len(DRIFT_BIN_EDGES)) == 0.0


SAMPLINGS = [
    SamplingConfig(temperature=0.0),
    SamplingConfig(temperature=1.1),
    SamplingConfig(temperature=1.1, top_k=20, top_p=0.95),
    SamplingConfig(temperature=0.7, top_p=0.8),
    SamplingConfig(temperature=1.3, min_p=0.05, top_k=5),
]


def _reference(logits, ids, sampling, vocab_size):
    lp = process_logits(logits[..., :vocab_size], sampling).log_softmax(-1)
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def logprob_case():
    """Padded vocab-parallel logits [2, 5, 768] (real vocab 731), token ids and per-SAMPLINGS references."""
    gen = torch.Generator().manual_seed(0)
    vocab, padded = 731, 768
    logits = torch.randn(2, 5, padded, generator=gen) * 3  # [b, s, v_padded]
    logits[..., vocab:] = 10.0  # padding would dominate if it were not excluded
    ids = logits[..., :vocab].argmax(-1)  # sampled tokens survive the filters, as sampled tokens do
    ids[0, 0] = logits[0, 0, :vocab].topk(3).indices[-1]
    return logits, ids, vocab, [_reference(logits, ids, s, vocab) for s in SAMPLINGS]


def test_vocab_parallel_token_logprobs_tp1():
    """TP=1 against the reference; the TP=2 case runs inside test_refresh_megatron's spawned world."""
    logits, ids, vocab, refs = logprob_case()
    for s, ref in zip(SAMPLINGS, refs):
        torch.testing.assert_close(vocab_parallel_token_logprobs(logits, ids, s, vocab_size=vocab), ref)
    # a token masked out by top-k gets -inf
    low = logits[0, 0, :vocab].argmin().reshape(1)
    lp = vocab_parallel_token_logprobs(
        logits[0, :1], low, SamplingConfig(temperature=1.0, top_k=5), vocab_size=vocab
    )
    assert torch.isinf(lp).all()
