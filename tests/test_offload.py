"""`rollout.offload_train_state` on CPU (step/offload.py): the key is a logged no-op there, and the gradient
hand-off itself (copy to host, device storage freed, storage back, copy back) is exact on Megatron's real
DDP gradient buffers, whose `main_grad` views survive it. The optimizer-state half and the round trip on a
GPU are in tests/test_gpu.py (`test_offload_train_state_round_trip_is_exact`)."""

from __future__ import annotations

import logging

import torch
from dist_utils import run_distributed


def _rank(rank: int, world: int, model_dir: str) -> dict:
    from megatron_utils import lm_forward_backward

    from opsd_megatron.config.schema import OptimizerConfig
    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.models import build_model
    from opsd_megatron.step.offload import TrainStateOffload, grad_buffers, offload_grads, restore_grads
    from opsd_megatron.step.optim import build_optimizer, wrap_ddp

    parallel.initialize(1, 1, seed=0)
    chunks = wrap_ddp(build_model(model_dir, torch.float32))
    opt = build_optimizer(OptimizerConfig(lr=1e-3), chunks, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 100, (2, 16), generator=g)
    lm_forward_backward(chunks, x, torch.roll(x, -1, 1))
    opt.step()
    lm_forward_backward(chunks, x, torch.roll(x, -1, 1))  # fresh gradients on top, optimizer state exists
    buffers = grad_buffers(chunks)
    params = [p for p in chunks[0].parameters() if p.requires_grad]
    before = [b.grad_data.clone() for b in buffers]
    main_before = [p.main_grad.clone() for p in params]
    res = {"buffers": len(buffers), "nonzero": any(bool(t.abs().sum() > 0) for t in before)}

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("opsd_megatron.step.offload").addHandler(handler)
    logging.getLogger("opsd_megatron.step.offload").setLevel(logging.INFO)
    off = TrainStateOffload(chunks, opt, enabled=True)
    with off.during_generation():
        res["noop_storage"] = [b.grad_data.untyped_storage().size() for b in buffers]
    res["active"], res["logged"] = off.active, [r.getMessage() for r in records]

    saved = offload_grads(buffers)
    res["freed"] = [b.grad_data.untyped_storage().size() for b in buffers]
    restore_grads(buffers, saved)
    res["exact"] = all(torch.equal(b.grad_data, t) for b, t in zip(buffers, before))
    res["views"] = all(torch.equal(p.main_grad, t) for p, t in zip(params, main_before))
    saved = offload_grads(buffers)  # again, restoring from changed host copies: the copy back is what counts
    restore_grads(buffers, [t + 1 for t in saved])
    res["copied"] = all(torch.equal(b.grad_data, t + 1) for b, t in zip(buffers, before))
    res["views_copied"] = all(torch.equal(p.main_grad, t + 1) for p, t in zip(params, main_before))
    res["sizes"] = [t.numel() * t.element_size() for t in before]
    parallel.destroy()
    return res


def test_offload_is_a_logged_noop_on_cpu_and_the_grad_round_trip_is_exact(tiny_qwen3_dir):
    (r,) = run_distributed(_rank, 1, str(tiny_qwen3_dir), timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert r["buffers"] >= 1 and r["nonzero"], r
    assert r["active"] is False
    assert any("no-op" in m for m in r["logged"]), r["logged"]
    assert r["noop_storage"] == r["sizes"], "the CPU no-op must leave the buffers in place"
    assert r["freed"] == [0] * r["buffers"], "offload_grads must free the buffers' storage"
    assert r["exact"] and r["views"], "gradients (and their main_grad views) must come back bit for bit"
    assert r["copied"] and r["views_copied"], "restore_grads must copy the host values back"
