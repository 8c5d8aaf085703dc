"""LoRA on the tiny Qwen3-MoE (8 experts, top-2, layer 0 dense): ONE spawned 2-rank run.

* Trainer: OPSD with adapters on attention, the dense MLP and every expert (`lora.target_experts`) at EP2
  and at TP2 (= expert-TP 2, sequence parallel, DP1) equals EP1 on the same rollouts (HF engine, top_k=1;
  world 2 = DP2 as in test_trainer_moe.py): loss, grad norm and the merged HF export after 2 steps. Only
  adapters train: every parameter with a gradient is a LoRA parameter and the base export (no merge) is
  the source checkpoint bit for bit, router included. The adapters-off teacher is the base model bit for
  bit (router included). The EP2 run's Megatron logits equal transformers' on its merged export. The EP2
  and TP2 training checkpoints, read at TP1 x EP1 by `opsd-convert megatron-to-hf`, export the same merged
  weights as their runs (expert keys with global offsets; SwiGLU halves of fc1's B under TP).
* Expert-TP 2 at TP 1 (each rank its own tokens) equals expert-TP 1: logits, every adapter gradient summed
  over data parallelism as DDP does (PEFT layout), merged export.
* PEFT: on a MoE model without dense layers, at EP2, the written adapter (per-expert hub names, converted by
  peft to transformers 5's fused experts) gives the merged export's logits, fused and per_projection
  (up_proj un-adapted: written as a zero adapter).
Bad input (no spawn): the start-up ConfigErrors and the apply_lora errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import run_distributed
from test_trainer_moe import _config as moe_run_config

ENV = {"OMP_NUM_THREADS": "1"}
RANK, ALPHA = 4, 8.0
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 40, 41], [100, 200, 300, 400, 500, 600, 7, 8, 9, 10]])
FP32 = dict(rtol=1e-4, atol=1e-5)


def _config(model_dir, out_dir, ep: int) -> dict:
    """test_trainer_moe's tiny-MoE run (HF engine, top_k=1, 2 steps) with LoRA on every linear and expert."""
    cfg = moe_run_config(model_dir, out_dir, ep)
    cfg["optimizer"]["lr"] = 1e-2
    cfg["lora"] = {
        "enabled": True,
        "rank": RANK,
        "alpha": ALPHA,
        "target_modules": ["all-linear"],
        "target_experts": True,
        "export_peft": False,  # layer 0's dense MLP adapter: PEFT cannot hold it on a MoE model
    }
    return cfg


def _merged(chunks) -> dict:
    from opsd_megatron.mcore.conversion import export_hf_weights
    from opsd_megatron.mcore.lora import lora_shard_hook

    return dict(export_hf_weights(chunks, shard_hook=lora_shard_hook))


def _fresh(model_dir, lora_cfg=None, **build):
    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.lora import apply_lora
    from opsd_megatron.mcore.models import build_model

    chunks = build_model(model_dir, torch.float32, perform_initialization=False, **build)
    load_hf_weights(chunks, model_dir)
    if lora_cfg is not None:
        apply_lora(chunks, lora_cfg)
    return chunks


def _trainer_checks(model_dir, out_dir) -> dict:
    import contextlib
    import io

    from opsd_megatron.cli import convert as cli
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.mcore.conversion import export_hf_weights
    from opsd_megatron.mcore.lora import adapters_disabled, is_lora_param_name
    from opsd_megatron.mcore.models import forward_logits, unwrap
    from opsd_megatron.run.trainer import Trainer

    res: dict = {}
    ckpts = {}
    for ep in ("tp2", 1, 2):
        raw = _config(model_dir, f"{out_dir}/ep{ep}", 1 if ep == "tp2" else ep)
        if ep == "tp2":  # TP2 = expert-TP 2 (sequence parallel), DP1
            raw["parallel"].update(tp=2, sequence_parallel=True)
        cfg = config_from_dict(raw)
        trainer = Trainer(cfg)
        try:
            res[ep] = trainer.train()
            if ep == "tp2":
                ckpts["tp2"] = trainer.save("test")
            if ep != 2:
                continue
            chunks = [unwrap(c) for c in trainer.state.chunks]
            res["layout"] = (trainer.state.ps.ep, trainer.state.ps.dp, trainer.state.ps.ep_rank)
            res["trainable"] = sorted(n for c in chunks for n, p in c.named_parameters() if p.requires_grad)
            res["not_lora"] = [n for n in res["trainable"] if not is_lora_param_name(n)]
            named = [(n, p) for c in chunks for n, p in c.named_parameters() if is_lora_param_name(n)]
            res["expert_allreduce"] = sorted({p.allreduce for n, p in named if ".local_experts." in n})
            res["base_export"] = dict(export_hf_weights(chunks))  # the frozen base, no merge
            res["lora_logits"] = forward_logits(chunks, IDS)
            with adapters_disabled(chunks):
                off = forward_logits(chunks, IDS)
            res["teacher_equal"] = torch.equal(off, forward_logits(_fresh(model_dir), IDS))
            res["merged"] = _merged(chunks)
            ckpts["ep2"] = trainer.save("test")
        finally:
            trainer.close()
    # the training checkpoints read at TP1 x EP1 by opsd-convert: EP2's (expert adapters under global expert
    # keys) and TP2's (fc1 adapters' B in SwiGLU halves, expert adapters split over expert-TP)
    res["convert_rc"] = []
    for name, ckpt in ckpts.items():
        with contextlib.redirect_stdout(io.StringIO()):
            argv = ["megatron-to-hf", "--megatron", str(ckpt), "--out", f"{out_dir}/ckpt_{name}_hf"]
            res["convert_rc"].append(cli.main([*argv, "--tp", "1", "--ep", "1"]))
    return res


def _expert_tp_checks(rank, model_dir) -> dict:
    """Expert-TP 2 vs 1 at TP 1 (DP 2: each rank its own tokens, which the dispatcher all-gathers over
    expert-TP): per-rank logits, merged export, and every adapter gradient summed over data parallelism as
    Megatron's DDP does (dense and ETP1 experts: over DP; ETP2 experts: expert-DP is 1, no reduction)."""
    import torch.distributed as dist

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.lora import LoRASettings, iter_adapters
    from opsd_megatron.mcore.lora.peft_export import peft_adapter_tensors
    from opsd_megatron.mcore.models import forward_logits
    from tests.test_lora import set_random_lora

    cfg = LoRASettings(rank=RANK, alpha=ALPHA, target_modules=["all-linear"], target_experts=True)
    ids = IDS + 3 * rank  # each data-parallel rank its own tokens
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    out = {}
    for etp in (1, 2):
        parallel.initialize(1, 1, ep=1, etp=etp, seed=11)
        chunks = _fresh(model_dir, cfg)
        set_random_lora(chunks)
        chunks[0].eval()  # with autograd; eval: no router aux loss in the gradient
        logits = forward_logits(chunks, ids)
        local = chunks[0](ids, pos, None)  # [b, s, v_padded]
        w = torch.linspace(-1, 1, local.numel()).reshape(local.shape)
        (local * w).sum().backward()
        for name, _, ad in iter_adapters(chunks):
            if not (etp == 2 and ".local_experts." in name):
                for p in (ad.lora_a, ad.lora_b):
                    dist.all_reduce(p.grad)  # the data-parallel gradient sum (world = DP 2)
        out[etp] = (logits, peft_adapter_tensors(chunks, which="grad"), _merged(chunks), ad.tp_size)
    return out


def _peft_writes(model_dir, out_dir) -> dict:
    """At EP2: merged HF export + PEFT adapter + Megatron logits, fused and per_projection (no up_proj)."""
    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import save_hf_checkpoint
    from opsd_megatron.mcore.lora import LoRASettings, lora_shard_hook
    from opsd_megatron.mcore.lora.peft_export import save_peft_adapter
    from opsd_megatron.mcore.models import forward_logits
    from tests.test_lora import set_random_lora

    parallel.initialize(1, 1, ep=2)
    out = {}
    cases = {"fused": ["all-linear"], "per_projection": ["q_proj", "v_proj", "gate_proj", "down_proj"]}
    for layout, targets in cases.items():
        cfg = LoRASettings(rank=RANK, alpha=ALPHA, target_modules=targets, target_experts=True, layout=layout)
        chunks = _fresh(model_dir, cfg)
        set_random_lora(chunks)
        save_hf_checkpoint(
            chunks, f"{out_dir}/{layout}/hf", tokenizer_dir=model_dir, shard_hook=lora_shard_hook
        )
        save_peft_adapter(chunks, f"{out_dir}/{layout}/adapter", cfg, base_model=str(model_dir))
        out[layout] = forward_logits(chunks, IDS)
    return out


def _bundle(rank, world, moe_dir, all_moe_dir, work):
    return {
        "trainer": _trainer_checks(moe_dir, f"{work}/trainer"),
        "expert_tp": _expert_tp_checks(rank, moe_dir),
        "peft": _peft_writes(all_moe_dir, f"{work}/peft"),
    }


def _hf_logits(model_dir, adapter=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_lora_moe_ep2_equals_ep1_expert_tp_and_exports(tiny_models, tiny_tokenizer_dir, tmp_path):
    from safetensors.torch import load_file

    from opsd_megatron.demo.tiny import make_tiny_hf_model

    moe_dir = tiny_models("qwen3_moe")
    all_moe = make_tiny_hf_model(tmp_path / "all_moe", "qwen3_moe", tokenizer_dir=tiny_tokenizer_dir,
                                 mlp_only_layers=[])  # fmt: skip
    res = run_distributed(_bundle, 2, str(moe_dir), str(all_moe), str(tmp_path), timeout=600, env=ENV)
    src = load_file(str(moe_dir / "model.safetensors"))

    # ---- trainer: EP2 == EP1, only adapters train, teacher exact, export and checkpoint -------------------
    t = [r["trainer"] for r in res]
    assert sorted(x["layout"] for x in t) == [(2, 2, 0), (2, 2, 1)]
    r1, r2 = t[0][1], t[0][2]
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [r["step"] for r in t[0]["tp2"]] == [1, 2]
    for a, b, c in zip(r1, r2, t[0]["tp2"]):
        assert math.isclose(a["loss"], c["loss"], rel_tol=1e-5), (a["loss"], c["loss"])
        assert math.isclose(a["grad_norm"], c["grad_norm"], rel_tol=1e-4), (a["grad_norm"], c["grad_norm"])
        assert a["response_tokens"] == b["response_tokens"] > 0
        assert math.isfinite(a["loss"]) and a["grad_norm"] > 0
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a["grad_norm"], b["grad_norm"])
    for x in t:
        assert x["not_lora"] == [] and any(".local_experts." in n for n in x["trainable"])
        assert not any("router" in n for n in x["trainable"])
        assert x["expert_allreduce"] == [False]  # EP2: expert-data-parallel gradient reduction
        assert x["teacher_equal"]
        assert sorted(x["base_export"]) == sorted(src)
        for k in src:
            assert torch.equal(x["base_export"][k], src[k]), k
    w1 = load_file(str(tmp_path / "trainer/ep1/hf/model.safetensors"))
    w2 = load_file(str(tmp_path / "trainer/ep2/hf/model.safetensors"))
    w3 = load_file(str(tmp_path / "trainer/eptp2/hf/model.safetensors"))
    assert sorted(w1) == sorted(w2) == sorted(w3) == sorted(src)
    experts = [k for k in src if ".mlp.experts." in k]
    idle = [k for k in experts if torch.equal(w1[k], src[k])]  # experts no token was routed to in 2 steps
    assert len(idle) <= len(experts) // 4, idle
    for k in src:
        if k.endswith("_proj.weight") and ".mlp.experts." not in k:
            assert not torch.equal(w1[k], src[k]), k  # q/k/v/o and the dense layer's gate/up/down moved
        elif ".mlp.experts." not in k:
            assert torch.equal(w1[k], src[k]) and torch.equal(w2[k], src[k]), k  # router, norms, embeddings
        assert torch.allclose(w1[k], w2[k], **FP32), (k, (w1[k] - w2[k]).abs().max())
        assert torch.allclose(w1[k], w3[k], **FP32), (k, (w1[k] - w3[k]).abs().max())
    assert [x["convert_rc"] for x in t] == [[0, 0], [0, 0]]
    from_ep2 = load_file(str(tmp_path / "trainer/ckpt_ep2_hf/model.safetensors"))  # read at TP1 x EP1
    from_tp2 = load_file(str(tmp_path / "trainer/ckpt_tp2_hf/model.safetensors"))
    for k in src:
        assert torch.equal(from_ep2[k], w2[k]), k
        assert torch.allclose(from_tp2[k], w3[k], rtol=0, atol=1e-6), (k, (from_tp2[k] - w3[k]).abs().max())
    ref = _hf_logits(tmp_path / "trainer/ep2/hf")
    for x in t:
        assert torch.allclose(x["lora_logits"], ref, **FP32), (x["lora_logits"] - ref).abs().max()
        for k in src:
            assert torch.equal(x["merged"][k], w2[k]), k  # in-run merged export == the written one

    # ---- expert-TP 2 == TP 1 ------------------------------------------------------------------------------
    for x in res:
        (l1, g1, m1, etp1), (l2, g2, m2, etp2) = x["expert_tp"][1], x["expert_tp"][2]
        assert (etp1, etp2) == (1, 2)  # the last adapter is an expert's: its TP group is expert-TP
        assert torch.allclose(l1, l2, **FP32)
        assert sorted(g1) == sorted(g2) and any(".mlp.experts.7.down_proj" in k for k in g1)
        for k in g1:
            assert g1[k].abs().max() > 0, k
            tol = 1e-5 * g1[k].abs().max().item()  # fp32, relative to the scale (loss = sum w * logits)
            assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=tol), (k, (g1[k] - g2[k]).abs().max())
        for k in m1:
            assert torch.allclose(m1[k], m2[k], **FP32), k

    # ---- PEFT adapter of expert LoRA (EP2) == merged export == Megatron ---------------------------------
    for layout in ("fused", "per_projection"):
        merged = _hf_logits(tmp_path / "peft" / layout / "hf")
        assert torch.allclose(res[0]["peft"][layout], merged, **FP32), layout
        peft = _hf_logits(all_moe, tmp_path / "peft" / layout / "adapter")
        assert torch.allclose(peft, merged, **FP32), (layout, (peft - merged).abs().max())
        assert not torch.allclose(merged, _hf_logits(all_moe), **FP32)


# ---- bad input --------------------------------------------------------------------------------------------
def _cfg(model_dir, parallel=None, **lora):
    from opsd_megatron.config import config_from_dict

    return config_from_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {"path": "builtin:tiny_math"},
            "parallel": parallel or {},
            "rollout": {"engine": "hf"},
            "lora": {"enabled": True, **lora},
        }
    )


def test_lora_moe_config_errors(tiny_models, tiny_qwen3_dir):
    from opsd_megatron.config import ConfigError, validate_model

    moe = tiny_models("qwen3_moe")
    with pytest.raises(ConfigError, match="lora.target_experts.*no MLP projection"):
        _cfg(moe, target_experts=True, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="parallel.etp.*is 2 with lora.target_experts"):
        _cfg(moe, target_experts=True, parallel={"ep": 2, "etp": 2})
    with pytest.raises(ConfigError, match="lora.target_experts.*lora.enabled is false"):
        _cfg(moe, enabled=False, target_experts=True)
    with pytest.raises(ConfigError, match="lora.target_experts.*no experts"):
        validate_model(_cfg(tiny_qwen3_dir, target_experts=True))
    with pytest.raises(ConfigError, match=r"lora.export_peft.*layers \[0\] have a dense MLP"):
        validate_model(_cfg(moe, target_experts=True))
    validate_model(_cfg(moe, target_experts=True, export_peft=False))
    validate_model(_cfg(moe, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


class _GroupedExperts(torch.nn.Module):
    """Stand-in for Transformer Engine's grouped expert linear (TEGroupedMLP's linear_fc1): TE and CUDA are
    not available on the CPU test machine, and the check needs only the module's kind and place."""

    parallel_mode = "column"  # like TEGroupedLinear: no `is_expert` attribute, no `weight`

    def __init__(self):
        super().__init__()
        self.weight0 = torch.nn.Parameter(torch.zeros(4, 4))


def test_lora_moe_apply_errors():
    from opsd_megatron.mcore.lora import LoRASettings, apply_lora

    chunk = torch.nn.Module()
    chunk.mlp = torch.nn.Module()
    chunk.mlp.experts = torch.nn.Module()
    chunk.mlp.experts.linear_fc1 = _GroupedExperts()
    with pytest.raises(
        ValueError, match="lora.target_experts=true: the MoE expert layer mlp.experts.linear_fc1"
    ):
        apply_lora([chunk], LoRASettings(rank=2, target_modules=["gate_proj"], target_experts=True))
    with pytest.raises(ValueError, match="lora.target_experts=true needs an MLP projection"):
        apply_lora([chunk], LoRASettings(rank=2, target_modules=["q_proj"], target_experts=True))
    # without target_experts the grouped experts are skipped (attention LoRA on grouped-GEMM MoE)
    with pytest.raises(ValueError, match="matched no layer"):
        apply_lora([chunk], LoRASettings(rank=2, target_modules=["gate_proj"]))
