"""`model.recompute` and `train.group_by_length` over real Megatron-core schedules on gloo (one spawned 2-rank
run, TP2 then PP2; fp32).

* Recompute: one next-token forward/backward through Megatron's schedule per mode (none / selective / full
  uniform / full block); every gradient equal to `none`'s (relative 1e-6), and the recomputation really ran
  (Megatron's checkpoint backward, counted) for selective and full, never for none.
* Length grouping: the OPSD teacher pass + student forward/backward (`step.opsd.teacher_hidden`,
  `student_step`) on a long-tailed length mix, packed in order (one length) vs grouped by length (one length
  per micro-batch; at PP2 the stages exchange shapes, `variable_seq_lengths`): the same loss sums and
  gradients (relative 1e-6: fp32 summation order), and less padding.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

REL = 1e-6  # fp32: the same arithmetic, at most a different summation order
MODES = (("none", "uniform"), ("selective", "uniform"), ("full", "uniform"), ("full", "block"))


def _rel(a: dict, b: dict) -> float:
    """Largest per-tensor relative difference ||a - b|| / ||b|| over the common keys."""
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in b)


def _grads(chunks) -> dict:
    out = {}
    for n, p in chunks[0].named_parameters():
        g = getattr(p, "main_grad", None) if getattr(p, "grad", None) is None else p.grad
        if g is not None:
            out[n] = g.detach().clone()
    return out


def _recompute_grads(model_dir: str, x, labels) -> dict:
    """{mode: (grads, recompute backward count)} at the current layout."""
    from megatron.core.tensor_parallel import random as mrandom
    from megatron_utils import lm_forward_backward

    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models import build_model

    calls = [0]
    fork = mrandom._fork_rng  # entered once per checkpointed segment's backward (CPU shim's version)

    def counting_fork():
        calls[0] += 1
        return fork()

    mrandom._fork_rng = counting_fork
    out = {}
    try:
        for mode, method in MODES:
            chunks = build_model(
                model_dir, perform_initialization=False, recompute=mode, recompute_method=method
            )
            load_hf_weights(chunks, model_dir)
            calls[0] = 0
            lm_forward_backward(chunks, x, labels)
            out[f"{mode}/{method}"] = (_grads(chunks), calls[0])
    finally:
        mrandom._fork_rng = fork
    return out


def _grouping(model_dir: str, vocab: int) -> dict:
    """Loss sums, gradients and padding of the OPSD step, packed in order vs grouped by length."""
    from megatron.core import parallel_state as mps
    from step_reference import fixed_samples

    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models import build_model
    from opsd_megatron.step.batch import pack_step, padding_fraction
    from opsd_megatron.step.opsd import LossSpec, student_step, teacher_hidden
    from opsd_megatron.step.teacher import make_teacher

    chunks = build_model(model_dir, perform_initialization=False, variable_seq_lengths=True)
    load_hf_weights(chunks, model_dir)
    teacher = make_teacher("current", chunks)
    samples = fixed_samples(vocab, n=8, seed=3, resp=(2, 48), s_prompt=(3, 6), t_prompt=(8, 20))
    samples[5].response = samples[5].response + samples[5].response * 2  # one long tail
    samples[5].rollout_logprobs = samples[5].rollout_logprobs * 3
    spec = LossSpec(kind="forward_kl", beta=0.0, temperature=1.0, clip=None, top_k=None, vocab_size=vocab,
                    tp_group=mps.get_tensor_model_parallel_group())  # fmt: skip
    out = {}
    for grouped in (False, True):
        mbs = pack_step(samples, micro_batch_size=2, pad_id=0, group_by_length=grouped)
        lengths = sorted({m.student_tokens.shape[1] for m in mbs})
        for p in chunks[0].parameters():
            p.grad = None
        with teacher.forward_context() as tc:
            th, tw = teacher_hidden(tc, mbs, micro_batch_size=2)
        g = sum(m.num_tokens for m in mbs)
        sums = student_step(chunks, mbs, th, tw, spec, scale=len(mbs) / g, micro_batch_size=2)
        out[grouped] = (sums, _grads(chunks), padding_fraction(mbs), lengths)
    return out


def _ranks(rank, world, model_dir, vocab):
    from opsd_megatron.mcore import parallel

    torch.manual_seed(0)
    x = torch.randint(3, vocab, (2, 24))
    labels = torch.randint(3, vocab, (2, 24))
    res = {}
    for tp, pp in ((2, 1), (1, 2)):
        parallel.initialize(tp, pp)
        res[(tp, pp, "recompute")] = _recompute_grads(model_dir, x, labels)
        res[(tp, pp, "grouping")] = _grouping(model_dir, vocab)
    parallel.destroy()
    summary = {}
    for (tp, pp, what), r in res.items():
        if what == "recompute":
            ref = r["none/uniform"][0]
            summary[(tp, pp, what)] = {k: (_rel(g, ref), n, len(g)) for k, (g, n) in r.items()}
        else:
            (s0, g0, p0, l0), (s1, g1, p1, l1) = r[False], r[True]
            loss = abs(s1["loss_sum"] - s0["loss_sum"]) / max(abs(s0["loss_sum"]), 1e-30)
            summary[(tp, pp, what)] = dict(
                loss=loss, tokens=(s0["tokens"], s1["tokens"]), grad=_rel(g1, g0), n=len(g0),
                pad=(p0[0] / p0[1], p1[0] / p1[1]), lengths=(l0, l1),
            )  # fmt: skip
    return summary


@pytest.fixture(scope="module")
def results(tiny_qwen3_dir):
    import json

    vocab = json.loads((tiny_qwen3_dir / "config.json").read_text())["vocab_size"]
    return run_distributed(_ranks, 2, str(tiny_qwen3_dir), vocab, timeout=1400)


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_recompute_gradients_equal_none(results, layout):
    for rank, summary in enumerate(results):
        r = summary[(*layout, "recompute")]
        n_params = r["none/uniform"][2]
        assert n_params > 0
        assert r["none/uniform"][1] == 0, "no recomputation without model.recompute"
        for mode, (rel, calls, n) in r.items():
            assert n == n_params, (rank, mode)
            assert rel <= REL, (rank, mode, rel)
            if mode != "none/uniform":
                assert calls > 0, f"rank {rank}: {mode} did not recompute"


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_length_grouping_same_loss_and_gradients(results, layout):
    for rank, summary in enumerate(results):
        r = summary[(*layout, "grouping")]
        assert len(r["lengths"][0]) == 1 and len(r["lengths"][1]) > 1, r["lengths"]  # really varied
        assert r["n"] > 0 and r["grad"] <= REL, (rank, r)
        last = layout[1] == 1 or rank == 1
        if last:  # loss sums live on the last stage
            assert r["tokens"][0] == r["tokens"][1] > 0
            assert r["loss"] <= REL, (rank, r)
        assert r["pad"][1] < r["pad"][0], r["pad"]
