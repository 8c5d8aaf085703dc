"""The Triton loss kernels and the fast CPU paths of the fused loss, checked on CPU.

* the kernels run in Triton's interpreter against the float64 reference (tests/triton_interp_check.py, in a
  subprocess: Triton reads TRITON_INTERPRET when a kernel is defined, so it must not leak into this process);
* the kernels compile for Hopper (sm_90) with the ptxas that ships in the Triton wheel (no GPU needed);
* the cache-blocked CPU path (`_rowblock`, chunks spanning several row blocks) matches float64;
* a failing fast variant is logged with its exception and skipped for that shape only; out-of-memory is
  re-raised.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsd_megatron.losses import _phase_math, _phases, fused_linear_divergence, vocab_parallel_divergence

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_in_interpreter_match_float64():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OPSD_LOSS_TRITON="interpret", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_interp_check.py")], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("PASS"), (
        out.stdout[-3000:] + out.stderr[-3000:]
    )
    assert out.stdout.count(" ok") >= 54  # every kernel x kind x clip x dtype line and the fused path ran


def test_triton_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: kernels are interpreted, not compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from opsd_megatron.losses import triton_phases as tp

    common = {"c": "i32", "v": "i32", "stride": "i32", "inv_t": "fp32"}
    scal = {"lb": "fp32", "l1": "fp32", "beta": "fp32", "clip": "fp32"}
    sig = {"ls_ptr": "*bf16", "lt_ptr": "*bf16", "shift_ptr": "*fp32", "out_ptr": "*fp32", **common, **scal}
    sig.update(KIND="constexpr", HAS_CLIP="constexpr", BLOCK="constexpr")
    src = ASTSource(
        fn=tp.terms_grad_kernel, signature=sig, constexprs={"KIND": 0, "HAS_CLIP": True, "BLOCK": 2048}
    )
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert "cubin" in k.asm and len(k.asm["cubin"]) > 0


def _inputs(t=40, h=24, v=300, seed=5):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(t, h, generator=g)
    ht = hs + 0.5 * torch.randn(t, h, generator=g)
    ws = torch.randn(v, h, generator=g) * 0.6
    wt = ws + 0.3 * torch.randn(v, h, generator=g)
    return hs, ws, ht, wt


@pytest.mark.parametrize("kind,clip", [("forward_kl", 0.05), ("forward_kl", None), ("reverse_kl", 0.05)])
def test_cpu_row_blocks_match_float64(kind, clip):
    """Chunks of 37 tokens = 3 row blocks of <= 16 rows (plus a 3-token chunk); token-mean backward."""
    hs, ws, ht, wt = _inputs()
    kw = dict(kind=kind, temperature=1.1, clip=clip)
    x = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    loss = fused_linear_divergence(x[0], x[1], ht, wt, chunk_size=37, **kw)
    loss.mean().backward()
    r = [hs.double().requires_grad_(True), ws.double().requires_grad_(True)]
    ref = vocab_parallel_divergence(r[0] @ r[1].t(), ht.double() @ wt.double().t(), **kw)
    ref.mean().backward()
    for got, want in ((loss, ref), (x[0].grad, r[0].grad), (x[1].grad, r[1].grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


class _Broken:
    """Stands in for a Triton kernel that fails to compile (the real failure needs a GPU)."""

    def __init__(self, exc):
        self.exc, self.calls = exc, 0

    def supported(self, *a):
        return None

    def stats(self, *a):
        self.calls += 1
        raise self.exc


def test_failing_kernel_logs_and_falls_back_for_that_shape_only(monkeypatch, caplog):
    broken = _Broken(RuntimeError("ptxas error: simulated"))
    monkeypatch.setattr(_phases, "_triton_kernels", lambda ls, lt, kind: broken)
    monkeypatch.setattr(_phases, "_FAILED", set())
    ls, lt = torch.randn(3, 50), torch.randn(3, 50)
    with caplog.at_level(logging.ERROR, logger=_phases.__name__):
        st = _phases._run(_phase_math.phase_stats, "forward_kl", ls, lt, 1.0)
        _phases._run(_phase_math.phase_stats, "forward_kl", ls, lt, 1.0)  # same shape: not retried
    torch.testing.assert_close(st, _phase_math.phase_stats(ls, lt, 1.0))
    assert broken.calls == 1
    assert "ptxas error: simulated" in caplog.text and "falling back for this shape" in caplog.text
    _phases._run(_phase_math.phase_stats, "forward_kl", torch.randn(3, 60), torch.randn(3, 60), 1.0)
    assert broken.calls == 2  # another shard width tries the kernel again


def test_out_of_memory_in_a_kernel_is_reraised(monkeypatch):
    monkeypatch.setattr(
        _phases, "_triton_kernels", lambda ls, lt, kind: _Broken(torch.OutOfMemoryError("oom"))
    )
    monkeypatch.setattr(_phases, "_FAILED", set())
    with pytest.raises(torch.OutOfMemoryError):
        _phases._run(_phase_math.phase_stats, "forward_kl", torch.randn(2, 8), torch.randn(2, 8), 1.0)


@pytest.mark.parametrize("clip", [0.05, None])
def test_cpu_row_blocks_extra_statistics_match_float64(clip):
    """The hand-scheduled forward-KL row blocks with the extra statistics (clipped count, H(p_S), H(p_T))
    against the float64 phases, on a 40-row chunk (3 row blocks)."""
    from opsd_megatron.losses._rowblock import dense_chunk_rows_

    g = torch.Generator().manual_seed(2)
    ls = torch.randn(40, 300, generator=g) * 3
    lt = ls + torch.randn(40, 300, generator=g)
    l64, t64 = ls.double(), lt.double()
    loss, grad, saved, ex = dense_chunk_rows_(
        ls.clone(),
        lt.clone(),
        kind="forward_kl",
        beta=0.5,
        temperature=1.1,
        clip=clip,
        need_grad=True,
        extra=True,
    )
    ref_loss, ref_grad, ref_saved, ref_ex = _phases.dense_chunk(
        l64.clone(), t64, kind="forward_kl", beta=0.5, temperature=1.1, clip=clip, group=None, need_grad=True,
        extra=True,
    )  # fmt: skip
    for got, want in ((loss, ref_loss), (grad, ref_grad), (saved, ref_saved), (ex, ref_ex)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_cpu_row_blocks_bf16_match_float64():
    """bf16 logits on CPU (the demo's dtype): fp32 math on copies of each row block, the gradient in bf16."""
    from opsd_megatron.losses._rowblock import dense_chunk_rows_

    g = torch.Generator().manual_seed(3)
    ls = (torch.randn(20, 300, generator=g) * 3).bfloat16()
    lt = (ls.float() + torch.randn(20, 300, generator=g)).bfloat16()
    loss, grad, saved, ex = dense_chunk_rows_(
        ls.clone(),
        lt.clone(),
        kind="forward_kl",
        beta=0.5,
        temperature=1.1,
        clip=0.05,
        need_grad=True,
        extra=True,
    )
    kw = dict(kind="forward_kl", beta=0.5, temperature=1.1, clip=0.05, need_grad=True, extra=True)
    ref = _phases.dense_chunk(ls.double(), lt.double(), group=None, **kw)
    assert grad.dtype == torch.bfloat16
    for got, want in zip((loss, grad, saved, ex), ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-3)
