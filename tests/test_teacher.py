"""Teacher modes on a TP=2 Megatron model: the frozen copy stays θ₀ while the student trains, EMA follows
d·θ_T + (1−d)·θ_S exactly, adapters-off is the base model, "current" is the student without grad, and
state dicts round-trip.

`teacher_checks` runs inside the spawned TP=2 processes of tests/test_lora.py (one spawn for all
distributed LoRA/teacher checks: start-up dominates on 2 cores); the tests here need no processes.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_lora import batch, build, full_logits, run_logits, set_random_lora


def teacher_checks(hf_dir: str) -> dict:
    """Runs inside the TP=2 processes of tests/test_lora.py::test_lora_tp2_and_teacher_modes."""
    from megatron.core import parallel_state as mps

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.lora import LoRASettings, apply_lora, merged_local_weight
    from opsd_megatron.step.teacher import AdaptersOffTeacher, make_teacher

    parallel.initialize(tp=2, pp=1, seed=5)
    tp_rank = mps.get_tensor_model_parallel_rank()
    student = build(hf_dir)
    build_fn = lambda: build(hf_dir)  # noqa: E731
    ids, w = batch(student[0].embedding.word_embeddings.weight.shape[0] * 2)
    v = w.shape[-1] // 2
    w_local = w[..., tp_rank * v : (tp_rank + 1) * v]
    theta0 = {n: p.detach().clone() for n, p in student[0].named_parameters()}
    with torch.no_grad():
        logits0 = run_logits(student[0], ids)

    decay = 0.75
    frozen = make_teacher("frozen", student, build_fn)
    ema = make_teacher("ema", student, build_fn, ema_decay=decay)
    current = make_teacher("current", student)
    assert (frozen.mode, ema.mode, current.mode) == ("frozen", "ema", "current")
    assert all(not p.requires_grad for _, p in frozen.named_teacher_parameters())

    opt = torch.optim.SGD(student[0].parameters(), lr=1e-3)
    expected = {n: t.float().clone() for n, t in theta0.items()}
    for _ in range(2):
        opt.zero_grad()
        (run_logits(student[0], ids) * w_local).sum().backward()
        opt.step()
        ema.after_optimizer_step()
        for n, p in student[0].named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach().float()
    moved = max((p - theta0[n]).abs().max().item() for n, p in student[0].named_parameters())
    assert moved > 1e-3, "the student should have trained"

    # frozen copy: still θ₀, and its forward is the initial model's
    for n, p in frozen.teacher_chunks[0].named_parameters():
        assert torch.equal(p, theta0[n]), n
    with frozen.forward_context() as chunks:
        t_logits = run_logits(chunks[0], ids)
    assert torch.equal(t_logits, logits0) and not t_logits.requires_grad
    # EMA math
    ema_err = max(
        (p.float() - expected[n]).abs().max().item() for n, p in ema.teacher_chunks[0].named_parameters()
    )
    assert ema_err < 1e-6, ema_err
    # current = the student, no grad, eval mode inside, training mode restored after
    with current.forward_context() as chunks:
        assert chunks[0] is student[0] and not chunks[0].training
        c_logits = run_logits(chunks[0], ids)
    assert student[0].training and not c_logits.requires_grad
    with torch.no_grad():
        assert torch.equal(c_logits, run_logits(student[0].eval(), ids))
    student[0].train()

    # state dicts round-trip (resume: a new teacher from the *trained* student gets θ₀ / the EMA back)
    f2 = make_teacher("frozen", student, build_fn)
    f2.load_state_dict(frozen.state_dict())
    assert all(torch.equal(p, theta0[n]) for n, p in f2.teacher_chunks[0].named_parameters())
    e2 = make_teacher("ema", student, build_fn, ema_decay=decay)
    e2.load_state_dict(ema.state_dict())
    assert all(
        torch.equal(p, q)
        for p, q in zip(e2.teacher_chunks[0].parameters(), ema.teacher_chunks[0].parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="teacher checkpoint has mode 'frozen'"):
        e2.load_state_dict(frozen.state_dict())

    # LoRA student: "frozen" means adapters-off (the base model, no copy); EMA starts from merged weights
    lora_student = build(hf_dir)
    with torch.no_grad():
        base_logits = run_logits(lora_student[0], ids)
    apply_lora(lora_student, LoRASettings(rank=4, alpha=8.0, target_modules=["all-linear"]))
    set_random_lora(lora_student)
    off = make_teacher("frozen", lora_student)
    assert isinstance(off, AdaptersOffTeacher)
    with off.forward_context() as chunks:
        assert torch.equal(run_logits(chunks[0], ids), base_logits)
    with torch.no_grad():
        assert not torch.equal(run_logits(lora_student[0], ids), base_logits)  # adapters back on
    lora_ema = make_teacher("ema", lora_student, build_fn)
    qkv = lora_student[0].decoder.layers[2].self_attention.linear_qkv
    t_qkv = lora_ema.teacher_chunks[0].decoder.layers[2].self_attention.linear_qkv.weight
    assert torch.equal(t_qkv, merged_local_weight(qkv)) and not torch.equal(t_qkv, qkv.weight)
    with lora_ema.forward_context() as chunks:
        ema_logits = run_logits(chunks[0], ids)
    with torch.no_grad():
        lora_logits = run_logits(lora_student[0], ids)
    merged_err = (full_logits(ema_logits) - full_logits(lora_logits)).abs().max().item()
    assert merged_err < 1e-5, merged_err
    return {"ema_err": ema_err, "student_moved": moved, "teacher_merged_err": merged_err}


def test_ema_fp32_shadow_and_errors():
    """Non-distributed: the EMA shadow is fp32 for a bf16 model; bad modes/arguments are clear errors."""
    from torch import nn

    from opsd_megatron.step.teacher import make_teacher

    class Tiny(nn.Module):  # stands in for a GPTModel chunk (EMA math needs only named parameters)
        def __init__(self):
            super().__init__()
            self.decoder = nn.Linear(4, 4, bias=False).to(torch.bfloat16)

    student = [Tiny()]
    with torch.no_grad():
        student[0].decoder.weight.fill_(1.0)
    ema = make_teacher("ema", student, lambda: [Tiny()], ema_decay=0.999)
    with torch.no_grad():
        student[0].decoder.weight.fill_(1.5)
    for _ in range(3):
        ema.after_optimizer_step()
    expect = 1.0 + 0.5 * (1 - 0.999**3)  # 1.0015: bf16 alone would stay at 1.0 (spacing 2^-7 near 1)
    shadow = ema.state_dict()["params"]["0.decoder.weight"]
    assert shadow.dtype == torch.float32
    torch.testing.assert_close(shadow, torch.full((4, 4), expect), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="teacher.mode must be one of"):
        make_teacher("bogus", student)
    with pytest.raises(ValueError, match="teacher.mode=ema needs build_fn"):
        make_teacher("ema", student)
    with pytest.raises(ValueError, match="teacher.mode=adapters_off needs LoRA"):
        make_teacher("adapters_off", student)
    with pytest.raises(ValueError, match="teacher.ema_decay must be in"):
        make_teacher("ema", student, lambda: [Tiny()], ema_decay=1.0)


def _train_step(chunks, opt) -> float:
    """One real step: forward, backward through Megatron's DDP, `finalize_model_grads` (the trainer's grad
    sync: DP, and TP for the q/k norms), Adam; the grad norm."""
    from megatron.core.distributed import finalize_model_grads

    ids, _ = batch(700)
    run_logits(chunks[0], ids).float().square().mean().backward()
    finalize_model_grads(chunks)
    _, grad_norm, _ = opt.step()
    return float(grad_norm)


def _ln_exp_avg(chunks, opt) -> torch.Tensor:
    """Adam's exp_avg of the final layernorm weight (replicated over TP: comparable across layouts)."""
    p = chunks[0].module.decoder.final_layernorm.weight
    inner = getattr(opt, "chained_optimizers", [opt])[0].optimizer
    return inner.state[p]["exp_avg"].clone()


def _ema_reshard(rank, world, hf_dir, root):
    """TP2: a trained step moves the student, an EMA teacher follows it away from θ₀, `save_checkpoint`; a
    fresh TP2 run resumes it (`load_checkpoint`, bitwise, RNG restored); a TP1 (DP2) run resumes the same
    checkpoint resharded: student, EMA teacher and Adam state equal the saved ones, the RNG states are not
    restored (one warning on rank 0), and the next step runs; a PP2 (TP1) run loads it bit-equal too."""
    import logging

    from opsd_megatron.config import config_from_dict
    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import export_hf_weights, load_hf_weights
    from opsd_megatron.mcore.models import build_model
    from opsd_megatron.run.checkpointing import load_checkpoint, save_checkpoint
    from opsd_megatron.step.optim import build_optimizer, build_scheduler, wrap_ddp
    from opsd_megatron.step.teacher import make_teacher

    opt_cfg = config_from_dict({"model": {"path": hf_dir}, "data": {"path": "x.jsonl"}}).optimizer
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: warnings.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("opsd_megatron.run.checkpointing").addHandler(handler)

    def setup(tp, pp=1):
        parallel.initialize(tp=tp, pp=pp, seed=3)
        build = lambda: build_model(hf_dir, torch.float32, perform_initialization=False)  # noqa: E731
        chunks = wrap_ddp(build())
        load_hf_weights([c.module for c in chunks], hf_dir)
        teacher = make_teacher("ema", chunks, build, ema_decay=0.5)
        opt = build_optimizer(opt_cfg, chunks, torch.float32)
        return chunks, teacher, opt, build_scheduler(opt_cfg, opt, 10)

    def weights(chunks):
        return {k: v.clone() for k, v in export_hf_weights(chunks)}

    def diff(a, b):  # over b's keys (a PP stage exports its own layers)
        return [k for k in b if not torch.equal(a[k], b[k])]

    chunks, teacher, opt, sched = setup(2)
    _train_step(chunks, opt)  # Adam state with nonzero moments
    theta0 = weights(teacher.teacher_chunks)
    gen = torch.Generator().manual_seed(0)  # the same on every rank: TP-replicated tensors stay equal
    with torch.no_grad():
        for p in chunks[0].module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    teacher.after_optimizer_step()
    teacher.after_optimizer_step()
    ref, ref_student = weights(teacher.teacher_chunks), weights([c.module for c in chunks])
    ref_m = _ln_exp_avg(chunks, opt)
    save_checkpoint(root, 1, chunks, opt, sched, teacher=teacher)
    chunks, teacher, opt, sched = setup(2)
    load_checkpoint(f"{root}/step_000001", chunks, opt, sched, teacher=teacher)
    same_tp = weights(teacher.teacher_chunks)
    warned_same = list(warnings)
    chunks, teacher, opt, sched = setup(1)
    step = load_checkpoint(f"{root}/step_000001", chunks, opt, sched, teacher=teacher)
    tp1, tp1_student = weights(teacher.teacher_chunks), weights([c.module for c in chunks])
    m_equal = torch.equal(_ln_exp_avg(chunks, opt), ref_m) and bool(ref_m.abs().sum() > 0)
    grad_norm = _train_step(chunks, opt)
    teacher.after_optimizer_step()
    moved_after = len(diff(weights([c.module for c in chunks]), tp1_student))
    n_warned = len(warnings)
    chunks, teacher, opt, sched = setup(1, pp=2)  # the same TP2 checkpoint at PP2 (tp 2 -> 1, pp 1 -> 2)
    load_checkpoint(f"{root}/step_000001", chunks, opt, sched, teacher=teacher)
    pp2, pp2_student = weights(teacher.teacher_chunks), weights([c.module for c in chunks])
    return {
        "n": len(ref), "moved": len(ref) - len([k for k in ref if torch.equal(ref[k], theta0[k])]),
        "diff_same": diff(ref, same_tp), "diff_tp1": diff(ref, tp1),
        "diff_student": diff(ref_student, tp1_student),
        "n_pp2": len(pp2), "diff_pp2": diff(ref, pp2) + diff(ref_student, pp2_student),
        "warned_pp2": warnings[n_warned:],
        "m_equal": m_equal, "step": step, "grad_norm": grad_norm, "moved_after": moved_after,
        "warned_same": warned_same, "warned": warnings[len(warned_same) : n_warned],
    }  # fmt: skip


def test_ema_teacher_checkpoint_is_sharded_and_full_resume_reshards_tp2_to_tp1(tiny_qwen3_dir, tmp_path):
    from dist_utils import run_distributed

    res = run_distributed(_ema_reshard, 2, str(tiny_qwen3_dir), str(tmp_path / "ckpt"), timeout=400)
    for rank, r in enumerate(res):
        assert r["n"] > 5 and r["moved"] == r["n"], r  # every teacher tensor left θ₀
        assert r["diff_same"] == [] and r["diff_tp1"] == [], r  # EMA bit-identical after load, TP2 and TP1
        assert r["diff_student"] == [] and r["m_equal"] and r["step"] == 1, r  # student and Adam moments too
        assert r["grad_norm"] > 0 and r["moved_after"] > 0, r  # the next step at TP1 runs and updates
        assert r["warned_same"] == [], r  # same layout: RNG restored, nothing logged
        if rank == 0:
            assert len(r["warned"]) == 1 and "RNG states were NOT" in r["warned"][0], r
            assert "tp 2 -> 1" in r["warned"][0] and "dp 1 -> 2" in r["warned"][0], r
            assert len(r["warned_pp2"]) == 1 and "pp 1 -> 2" in r["warned_pp2"][0], r
        else:
            assert r["warned"] == [] and r["warned_pp2"] == [], r  # logged once, on rank 0
        assert r["n_pp2"] > 5 and r["diff_pp2"] == [], r  # resumed at PP2: student and EMA bit-equal too
    from torch.distributed.checkpoint import FileSystemReader

    keys = list(FileSystemReader(str(tmp_path / "ckpt" / "step_000001")).read_metadata().state_dict_metadata)
    assert any(k.startswith("ema_teacher.") for k in keys) and not any("teacher_state" in k for k in keys)
