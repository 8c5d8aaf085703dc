"""LoRA `per_projection` layout and PEFT adapters out.

* per_projection at TP1 and TP2 == a plain-autograd reference on the transformers model (each HF
  projection W + (alpha/r) B_p A_p, with A_p, B_p leaf tensors): logits and every A_p / B_p gradient;
  the q/k/v update has rank 3r (fused: <= r).
* fused and per_projection: the exported PEFT tensors reproduce the Megatron LoRA logits through the same
  reference; `peft.PeftModel.from_pretrained(base, DIR)` of the written adapter gives the logits of the
  merged HF export (`lora_shard_hook`).

The distributed part runs inside tests/test_lora.py's one TP=2 spawn (`per_projection_checks`).
"""

from __future__ import annotations

import torch

RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARTIAL = ["q_proj", "v_proj", "o_proj", "up_proj"]  # per_projection: k and gate get no update


def reference_forward(hf_dir: str, peft_tensors: dict, ids: torch.Tensor, requires_grad: bool):
    """transformers logits [b, s, V] with every PEFT pair merged by plain autograd -> (logits, leaves)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    leaves = {k: v.clone().float().requires_grad_(requires_grad) for k, v in peft_tensors.items()}
    scale = ALPHA / RANK
    merged = dict(params)
    for k, a in leaves.items():
        if not k.endswith(".lora_A.weight"):
            continue
        stem = k.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        b = leaves[k.replace("lora_A", "lora_B")]
        merged[f"{stem}.weight"] = params[f"{stem}.weight"].detach() + scale * (b @ a)
    logits = torch.func.functional_call(model, merged, (ids,)).logits
    return logits, leaves


def per_projection_checks(hf_dir: str, out_dir: str, tps: tuple[int, ...] = (1, 2)) -> dict:
    """Run inside a 2-rank spawn after tests/test_lora.py's checks (both ranks)."""
    from megatron.core import parallel_state as mps

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights, save_hf_checkpoint
    from opsd_megatron.mcore.lora import LoRASettings, apply_lora, iter_adapters, lora_shard_hook
    from opsd_megatron.mcore.lora.peft_export import peft_adapter_tensors, save_peft_adapter
    from opsd_megatron.mcore.models import build_model
    from tests.test_lora import batch, full_logits, run_logits, set_random_lora

    out: dict = {}
    cases = [(tp, "per_projection", TARGETS, f"per_projection_tp{tp}") for tp in tps]
    cases += [(max(tps), "fused", TARGETS, f"fused_tp{max(tps)}")]  # fused TP1 == TP2: tests/test_lora.py
    cases += [(max(tps), "per_projection", PARTIAL, f"partial_tp{max(tps)}")]
    for tp, layout, targets, key in cases:
        parallel.initialize(tp=tp, pp=1, seed=11)
        chunks = build_model(hf_dir, torch.float32, perform_initialization=False)
        load_hf_weights(chunks, hf_dir)
        cfg = LoRASettings(rank=RANK, alpha=ALPHA, target_modules=targets, layout=layout)
        apply_lora(chunks, cfg)
        set_random_lora(chunks)
        qkv = next(ad for n, _, ad in iter_adapters(chunks) if n.endswith("linear_qkv"))
        if targets is TARGETS:
            out[f"qkv_delta_rank_{layout}"] = int(torch.linalg.matrix_rank(qkv.delta_weight()))
        ids, w = batch(chunks[0].opsd_info.padded_vocab_size)
        tp_rank = mps.get_tensor_model_parallel_rank()
        v_local = w.shape[-1] // tp
        logits = run_logits(chunks[0], ids)
        (logits * w[..., tp_rank * v_local : (tp_rank + 1) * v_local]).sum().backward()
        meg = full_logits(logits)
        tensors = peft_adapter_tensors(chunks)
        vocab = chunks[0].opsd_info.vocab_size
        ref, leaves = reference_forward(hf_dir, tensors, ids, requires_grad=layout == "per_projection")
        out[f"logits_err_{key}"] = (meg[..., :vocab] - ref.detach()).abs().max().item()
        if layout == "per_projection":
            grads = peft_adapter_tensors(chunks, which="grad")
            (ref * w[..., :vocab]).sum().backward()
            out[f"grad_rel_err_{key}"] = max(
                ((grads[k] - g.grad).abs().max() / g.grad.abs().max().clamp_min(1e-12)).item()
                for k, g in leaves.items()
            )
            out[f"n_peft_tensors_{key}"] = len(tensors)
        if tp == max(tps) and targets is TARGETS:  # what a run writes at its end: adapter + merged export
            save_peft_adapter(chunks, f"{out_dir}/{layout}/adapter", cfg, base_model=hf_dir)
            save_hf_checkpoint(chunks, f"{out_dir}/{layout}/merged", shard_hook=lora_shard_hook)
            if layout == "per_projection":
                _export_lora_cli(chunks, hf_dir, f"{out_dir}/run", tp)
    return out


def _export_lora_cli(chunks, hf_dir: str, run_dir: str, tp: int) -> None:
    """A training run's layout (config.yaml + checkpoints/step_000001 with the model's sharded state) ->
    `opsd-convert export-lora` -> run_dir/cli_adapter (compared with the direct export by the caller)."""
    import json
    import os

    import yaml
    from megatron.core import dist_checkpointing

    from opsd_megatron.cli.convert import main as cli_main
    from opsd_megatron.run.checkpointing import STATE_FILE

    step = f"{run_dir}/checkpoints/step_000001"
    if torch.distributed.get_rank() == 0:
        os.makedirs(step)
        lora = {"enabled": True, "rank": RANK, "alpha": ALPHA, "target_modules": TARGETS}
        cfg = {"model": {"path": hf_dir, "dtype": "float32"}, "data": {"path": "unused.jsonl"}}
        cfg["lora"] = {**lora, "layout": "per_projection"}
        with open(f"{run_dir}/config.yaml", "w") as f:
            yaml.safe_dump(cfg, f)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": chunks[0].sharded_state_dict()}, step)
    if torch.distributed.get_rank() == 0:
        with open(f"{step}/{STATE_FILE}", "w") as f:
            json.dump({"step": 1}, f)
    torch.distributed.barrier()
    argv = ["export-lora", "--megatron", step, "--out", f"{run_dir}/cli_adapter", "--tp", str(tp)]
    assert cli_main(argv) == 0


def check_per_projection_results(results: list[dict]) -> None:
    """Assertions on `per_projection_checks`' per-rank results (called by tests/test_lora.py)."""
    for r in results:
        assert r["qkv_delta_rank_per_projection"] == 3 * RANK, r  # three independent rank-r updates
        assert r["qkv_delta_rank_fused"] == RANK, r  # one shared A: rank <= r
        for key in ("per_projection_tp1", "per_projection_tp2", "fused_tp2", "partial_tp2"):
            assert r[f"logits_err_{key}"] < 1e-4, (key, r)
        for key, n_proj in (("per_projection_tp1", 7), ("per_projection_tp2", 7), ("partial_tp2", 4)):
            assert r[f"grad_rel_err_{key}"] < 1e-4, (key, r)
            assert r[f"n_peft_tensors_{key}"] == 2 * n_proj * 4, r  # (A, B) x projections x 4 layers


def check_cli_adapter(peft_dir) -> None:
    """`opsd-convert export-lora` of the saved checkpoint wrote the same PEFT adapter as the direct export."""
    from safetensors.torch import load_file

    direct = load_file(f"{peft_dir}/per_projection/adapter/adapter_model.safetensors")
    cli = load_file(f"{peft_dir}/run/cli_adapter/adapter_model.safetensors")
    assert direct.keys() == cli.keys() and len(direct) == 2 * 7 * 4
    assert all(torch.equal(direct[k], cli[k]) for k in direct)
    assert (peft_dir / "run/cli_adapter/adapter_config.json").read_text() == (
        peft_dir / "per_projection/adapter/adapter_config.json"
    ).read_text()


def peft_logits_vs_merged(hf_dir: str, layout_dir: str) -> float:
    """max |logits| difference: PeftModel.from_pretrained(base, adapter) vs the merged HF export."""
    import peft
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 700, (2, 10), generator=torch.Generator().manual_seed(5))
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, f"{layout_dir}/adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(f"{layout_dir}/merged", dtype=torch.float32).eval()
    with torch.no_grad():
        lp, lm = model(ids).logits, merged(ids).logits
        with model.disable_adapter():
            lb = model(ids).logits
    assert (lp - lb).abs().max() > 1e-3, "the loaded adapter should change the logits"
    return (lp - lm).abs().max().item()


def _train_then_export(rank: int, world: int, cfg_dict: dict, cli_out: str) -> int:
    from opsd_megatron.cli.convert import main as cli_main
    from tests.test_trainer import run_opsd

    step = run_opsd(rank, world, cfg_dict)["step"]
    ckpt = f"{cfg_dict['output_dir']}/checkpoints/step_{step:06d}"
    assert cli_main(["export-lora", "--megatron", ckpt, "--out", cli_out]) == 0
    return step


def test_lora_run_writes_peft_adapter(tiny_qwen3_dir, tmp_path):
    """A LoRA (per_projection) training run ends with <output_dir>/adapter next to the merged hf/ export; PEFT
    loads it and reproduces hf/'s logits; `opsd-convert export-lora` of the run's final training checkpoint
    (DDP-wrapped model, optimizer state) writes the same adapter. One process, HF rollouts (no vLLM)."""
    from safetensors.torch import load_file

    from tests.dist_utils import run_distributed
    from tests.test_trainer import tiny_config

    run = tmp_path / "run"
    cfg = tiny_config(
        tiny_qwen3_dir, run, parallel={"tp": 1, "pp": 1}, rollout={"engine": "hf", "max_new_tokens": 8},
        train={"steps": 1}, checkpoint={"export_hf": True}, teacher={"mode": "adapters_off"},
        lora={"enabled": True, "rank": RANK, "alpha": ALPHA, "layout": "per_projection"},
        optimizer={"lr": 0.05, "clip_grad": 1.0},
    )  # fmt: skip
    assert run_distributed(_train_then_export, 1, cfg, str(tmp_path / "cli"), timeout=300) == [1]
    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(trained) == 2 * 7 * 4 and any(t.abs().max() > 0 for k, t in trained.items() if "lora_B" in k)
    cli = load_file(tmp_path / "cli" / "adapter_model.safetensors")
    assert trained.keys() == cli.keys() and all(torch.equal(trained[k], cli[k]) for k in cli)
    (run / "merged").symlink_to(run / "hf")  # the layout peft_logits_vs_merged reads: DIR/adapter, DIR/merged
    assert peft_logits_vs_merged(str(tiny_qwen3_dir), str(run)) < 1e-5
