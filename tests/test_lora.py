"""LoRA on Megatron linear layers: TP=2 equals TP=1 (forward and gradients, fp32), merged weights give the
LoRA model's logits, adapters-off is the base model bit for bit, the checkpoint sharding is right.

All distributed checks (these and the teacher modes of tests/test_teacher.py) share one spawned
2-process gloo run: on the 2-core CI machine process start-up costs more than the checks.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import pytest
import torch

from tests.dist_utils import run_distributed

RANK, ALPHA = 4, 8.0


# ---- helpers shared with test_teacher.py ------------------------------------------------------------------
def shard_like(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of a full Megatron tensor, from the parameter's TP attributes."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = full.chunk(stride, dim=dim)  # stride 2: SwiGLU fc1 = [gate shard r ‖ up shard r]
    return torch.cat([p.chunk(tp, dim=dim)[tp_rank] for p in parts], dim=dim)


def build(hf_dir, full_state=None, **overrides):
    """One model chunk (fp32); with `full_state` {name: full tensor}, this rank's shards are loaded."""
    from megatron.core import parallel_state as mps

    from opsd_megatron.mcore.models import build_model

    chunks = build_model(hf_dir, torch.float32, **overrides)
    if full_state is not None:
        tp, r = mps.get_tensor_model_parallel_world_size(), mps.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for n, p in chunks[0].named_parameters():
                p.copy_(shard_like(full_state[n], p, r, tp))
    return chunks


def batch(vpad: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 700, (2, 12), generator=g)
    w = torch.randn(2, 12, vpad, generator=g)  # loss = <logits, w>: a dense, nontrivial gradient
    return ids, w


def run_logits(chunk, ids):
    """Vocab-parallel logits [b, s, v_padded/tp] (training-mode forward, keeps the graph)."""
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return chunk(ids, pos, None)


def full_logits(local: torch.Tensor) -> torch.Tensor:
    """All-gather the vocab-parallel logits over TP -> [b, s, v_padded]."""
    from megatron.core import parallel_state as mps

    tp = mps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local.detach()
    parts = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(
        parts, local.detach().contiguous(), group=mps.get_tensor_model_parallel_group()
    )
    return torch.cat(parts, dim=-1)


def set_random_lora(chunks, scale: float = 0.05):
    """Give every adapter deterministic nonzero full A and B (B starts at zero otherwise)."""
    from opsd_megatron.mcore.lora import global_module_name, iter_adapters

    for name, _, ad in iter_adapters(chunks):
        gname = global_module_name(chunks[0], name.split(".", 1)[1])
        g = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
        ad.set_full_weights(
            torch.randn(ad.a_rows, ad.in_features, generator=g) * scale,
            torch.randn(ad.out_features, ad.rank, generator=g) * scale,
        )


# ---- the distributed body --------------------------------------------------------------------------
def _lora_tp_checks(rank: int, world: int, hf_dir: str, ckpt_dir: str) -> dict:
    from megatron.core import parallel_state as mps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.lora import (
        LoRASettings,
        adapters_disabled,
        apply_lora,
        lora_shard_hook,
        lora_state_dict,
        merged_named_parameters,
        trainable_named_parameters,
    )

    cfg = LoRASettings(
        rank=RANK, alpha=ALPHA, target_modules=["q_proj", "k", "v_proj", "o", "gate", "up", "down"]
    )
    out: dict = {}

    # -- TP=1 reference (both ranks compute it; DP=2) --
    parallel.initialize(tp=1, pp=1, seed=11)
    ref = build(hf_dir)
    full_state = {n: p.detach().clone() for n, p in ref[0].named_parameters()}
    ids, w = batch(full_state["embedding.word_embeddings.weight"].shape[0])
    with torch.no_grad():
        base1 = run_logits(ref[0], ids)
    apply_lora(ref, cfg)
    set_random_lora(ref)
    logits1 = run_logits(ref[0], ids)
    (logits1 * w).sum().backward()
    grads1 = {n: p.grad.clone() for n, p in ref[0].named_parameters() if p.requires_grad}
    assert set(grads1) == {n for n, _ in ref[0].named_parameters() if ".lora." in n}
    assert all(p.grad is None for n, p in ref[0].named_parameters() if ".lora." not in n)
    assert len(grads1) == 2 * 4 * 4  # (a, b) x 4 layers x (qkv, proj, fc1, fc2)
    lora_full = {n: t.clone() for n, t in lora_state_dict(ref).items()}  # TP=1: full tensors
    logits1 = logits1.detach()
    assert not torch.allclose(logits1, base1, atol=1e-3), "the random adapters should change the logits"

    # -- TP=2 --
    parallel.initialize(tp=2, pp=1, seed=11)
    tp_rank = mps.get_tensor_model_parallel_rank()
    chunks = build(hf_dir, full_state)
    with torch.no_grad():
        base2 = run_logits(chunks[0], ids)
    out["base_tp2_vs_tp1"] = (full_logits(base2) - base1).abs().max().item()
    adapters = apply_lora(chunks, cfg)
    assert len(adapters) == 16
    set_random_lora(chunks)
    local_lora = lora_state_dict(chunks)
    for k, t in local_lora.items():  # same adapters as TP=1, sharded like the base layer
        p = dict(chunks[0].named_parameters())[k.split(".", 1)[1]]
        torch.testing.assert_close(t, shard_like(lora_full[k], p, tp_rank, 2), rtol=0, atol=0)
    v_local = w.shape[-1] // 2
    w_local = w[..., tp_rank * v_local : (tp_rank + 1) * v_local]
    logits2 = run_logits(chunks[0], ids)
    (logits2 * w_local).sum().backward()
    out["logits_tp2_vs_tp1"] = (full_logits(logits2) - logits1).abs().max().item()
    assert out["logits_tp2_vs_tp1"] < 1e-4, out
    params2 = dict(chunks[0].named_parameters())
    gerr = 0.0
    for n, g1 in grads1.items():
        g2 = params2[n].grad
        expect = shard_like(g1, params2[n], tp_rank, 2)
        gerr = max(gerr, ((g2 - expect).abs().max() / expect.abs().max().clamp_min(1e-12)).item())
    out["grad_rel_err_tp2_vs_tp1"] = gerr
    assert gerr < 1e-4, out
    assert {n for n, _ in trainable_named_parameters(chunks)} == {f"0.{n}" for n in grads1}

    # adapters off == the base model, bit for bit
    with torch.no_grad(), adapters_disabled(chunks):
        off = run_logits(chunks[0], ids)
    assert torch.equal(off, base2), "adapters_disabled must reproduce the base model exactly"
    assert all(ad.enabled for ad in adapters.values())

    # merged weights (what export streams) == forward with adapters
    plain = build(hf_dir)
    with torch.no_grad():
        merged = dict(merged_named_parameters(chunks[0]))
        assert set(merged) == {n for n, _ in plain[0].named_parameters()}
        for n, p in plain[0].named_parameters():
            p.copy_(merged[n])
        mlog = run_logits(plain[0], ids)
    out["merged_vs_lora"] = (mlog - logits2.detach()).abs().max().item()
    assert out["merged_vs_lora"] < 1e-4, out
    # the export hook: HF tensors streamed from the LoRA model == those of the merged plain model
    from opsd_megatron.mcore.conversion import export_hf_weights

    hf_lora = dict(export_hf_weights(chunks, shard_hook=lora_shard_hook))
    hf_plain = dict(export_hf_weights(plain))
    assert hf_lora.keys() == hf_plain.keys() and not any("lora" in k for k in hf_lora)
    assert all(torch.equal(hf_lora[k], hf_plain[k]) for k in hf_plain)
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"  # merging never touches the base weight
    assert torch.equal(params2[fc1], shard_like(full_state[fc1], params2[fc1], tp_rank, 2))

    # distributed-checkpoint sharding of the adapters
    sd = chunks[0].sharded_state_dict()
    qkv_b = sd["decoder.layers.1.self_attention.linear_qkv.lora.lora_b"]
    proj_a = sd["decoder.layers.1.self_attention.linear_proj.lora.lora_a"]
    proj_b = sd["decoder.layers.1.self_attention.linear_proj.lora.lora_b"]
    assert isinstance(qkv_b, ShardedTensor) and qkv_b.global_shape[-2:] == (4 * 32 + 2 * 2 * 32, RANK)
    assert qkv_b.axis_fragmentations[-2] == 2 and proj_a.axis_fragmentations[-1] == 2
    assert proj_a.global_shape[-1] == 4 * 32 and proj_b.axis_fragmentations[-2:] == (1, 1)
    assert type(sd["decoder.layers.1.mlp.linear_fc1.lora.lora_b"]).__name__ == "ShardedTensorFactory"

    # distributed checkpoint: save at TP=2, load into a TP=1 LoRA model (resharding) -> the same adapters
    from megatron.core import dist_checkpointing

    if rank == 0:
        os.makedirs(ckpt_dir)
    torch.distributed.barrier()
    dist_checkpointing.save(sd, ckpt_dir)
    torch.distributed.barrier()
    sp_out = _sequence_parallel_checks(tp_rank)
    parallel.initialize(tp=1, pp=1, seed=11)
    back = build(hf_dir)
    apply_lora(back, cfg)
    back[0].load_state_dict(dist_checkpointing.load(back[0].sharded_state_dict(), ckpt_dir))
    reloaded = lora_state_dict(back)
    assert reloaded.keys() == lora_full.keys()
    assert all(torch.equal(reloaded[k], lora_full[k]) for k in lora_full), "TP=2 -> TP=1 LoRA reload differs"
    parallel.initialize(tp=2, pp=1, seed=11)
    out.update(sp_out)
    return out


class _ColumnRowPair(torch.nn.Module):
    """linear_fc1 (column, [64 -> 96]) then linear_fc2 (row, [96 -> 64]), like an MLP without activation."""

    def __init__(self, sequence_parallel: bool):
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        cfg = ModelParallelConfig(
            tensor_model_parallel_size=2, sequence_parallel=sequence_parallel, use_cpu_initialization=True
        )
        init = torch.nn.init.zeros_
        self.linear_fc1 = ColumnParallelLinear(64, 96, config=cfg, init_method=init, bias=False)
        self.linear_fc2 = RowParallelLinear(
            96, 64, config=cfg, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=True
        )

    def forward(self, x):
        return self.linear_fc2(self.linear_fc1(x)[0])[0]


@contextlib.contextmanager
def _cpu_device_mode():
    """Megatron's SP backward allocates on `torch.cuda.current_device()`, outside the CPU shim's
    TorchFunctionMode (autograd Function backward): make that device "cpu" for the duration."""
    if torch.cuda.is_available():
        yield
        return
    orig = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = orig


def _sequence_parallel_checks(tp_rank: int) -> dict:
    from megatron.core import parallel_state as mps

    from opsd_megatron.mcore.lora import LoRASettings, adapters_disabled, apply_lora

    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(96, 64, generator=g) * 0.1, torch.randn(64, 96, generator=g) * 0.1
    x, wy = torch.randn(8, 2, 64, generator=g), torch.randn(8, 2, 64, generator=g)
    results = {}
    for sp in (False, True):
        m = _ColumnRowPair(sp)
        with torch.no_grad():
            m.linear_fc1.weight.copy_(shard_like(w1, m.linear_fc1.weight, tp_rank, 2))
            m.linear_fc2.weight.copy_(shard_like(w2, m.linear_fc2.weight, tp_rank, 2))
        apply_lora([m], LoRASettings(rank=RANK, alpha=ALPHA, target_modules=["linear_fc1", "linear_fc2"]))
        set_random_lora([m], scale=0.2)
        rows = slice(tp_rank * 4, tp_rank * 4 + 4) if sp else slice(None)
        xin = x[rows].clone().requires_grad_(True)
        y = m(xin)
        with torch.no_grad(), adapters_disabled([m]):
            assert (m(xin) - y).abs().max() > 1e-3, "the adapters should change the output"
        with _cpu_device_mode():
            (y * wy[rows]).sum().backward()
        grads = {}
        for n, p in m.named_parameters():
            if p.requires_grad:
                gr = p.grad.clone()
                if getattr(p, "sequence_parallel", False):
                    torch.distributed.all_reduce(gr, group=mps.get_tensor_model_parallel_group())
                grads[n] = gr
        results[sp] = (y.detach(), xin.grad, grads)
    (y0, dx0, g0), (y1, dx1, g1) = results[False], results[True]
    rows = slice(tp_rank * 4, tp_rank * 4 + 4)
    gerr = max(((g1[n] - g0[n]).abs().max() / g0[n].abs().max()).item() for n in g0)
    return {
        "sp_out_err": (y1 - y0[rows]).abs().max().item(),
        "sp_dx_err": (dx1 - dx0[rows]).abs().max().item(),
        "sp_grad_rel_err": gerr,
        "sp_params": sorted(g1),
    }


def _all_tp2_checks(rank: int, world: int, hf_dir: str, ckpt_dir: str, peft_dir: str) -> dict:
    """One spawned run for every distributed LoRA and teacher check (process start-up dominates)."""
    from tests.test_lora_peft import per_projection_checks
    from tests.test_teacher import teacher_checks

    out = _lora_tp_checks(rank, world, hf_dir, ckpt_dir)
    out.update(teacher_checks(hf_dir))
    out.update(per_projection_checks(hf_dir, peft_dir))
    return out


def test_lora_tp2_and_teacher_modes(tiny_qwen3_dir, tmp_path):
    """LoRA TP=2 (with and without SP) == TP=1, merge, adapters-off, checkpoint sharding; then the teacher
    modes of tests/test_teacher.py and the per_projection / PEFT checks of tests/test_lora_peft.py on the
    same TP=2 processes; PEFT loads the adapters written there."""
    from tests.test_lora_peft import check_cli_adapter, check_per_projection_results, peft_logits_vs_merged

    peft_dir = tmp_path / "peft"
    results = run_distributed(
        _all_tp2_checks, 2, str(tiny_qwen3_dir), str(tmp_path / "ckpt"), str(peft_dir), timeout=400
    )
    check_per_projection_results(results)
    check_cli_adapter(peft_dir)
    for layout in ("per_projection", "fused"):  # PEFT loads what a LoRA run writes at its end
        assert peft_logits_vs_merged(str(tiny_qwen3_dir), str(peft_dir / layout)) < 1e-5, layout
    for r in results:
        assert r["base_tp2_vs_tp1"] < 1e-5, r
        assert r["logits_tp2_vs_tp1"] < 1e-5, r
        assert r["grad_rel_err_tp2_vs_tp1"] < 1e-5, r
        assert r["merged_vs_lora"] < 1e-5, r
        assert r["sp_out_err"] < 1e-5 and r["sp_dx_err"] < 1e-5 and r["sp_grad_rel_err"] < 1e-5, r
        assert len(r["sp_params"]) == 4, r
        assert r["ema_err"] < 1e-6 and r["teacher_merged_err"] < 1e-5, r


def test_resolve_targets_and_errors():
    from opsd_megatron.mcore.lora import resolve_targets

    assert resolve_targets(["q_proj", "k_proj", "v_proj", "o_proj"]) == {"linear_qkv", "linear_proj"}
    assert resolve_targets(["gate", "up", "down"]) == {"linear_fc1", "linear_fc2"}
    assert resolve_targets("all-linear") == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    assert resolve_targets(["q_proj"]) == {"linear_qkv"}  # partial fused target: whole layer (warned)
    with pytest.raises(ValueError, match="lora.target_modules: unknown layer 'lm_head'"):
        resolve_targets(["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lora.target_modules is empty"):
        resolve_targets([])
