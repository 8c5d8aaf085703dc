"""The Triton loss kernels (opsd_megatron/losses/triton_phases.py) against the float64 reference, on CPU
through Triton's interpreter. Run by tests/test_triton_kernels.py in a subprocess, because Triton reads
TRITON_INTERPRET when a kernel is defined (at import), so the variable must be set before anything imports
Triton and must not leak into other tests:

    TRITON_INTERPRET=1 OPSD_LOSS_TRITON=interpret python tests/triton_interp_check.py

Prints one line per check ('ok' / 'FAIL' and the max relative error) and exits 1 on any failure.
Small shapes with BLOCK = 64 so every row spans several blocks plus a masked tail.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see the docstring)"
os.environ.setdefault("OPSD_LOSS_TRITON", "interpret")

import torch  # noqa: E402

from opsd_megatron.losses import (  # noqa: E402
    _phase_math,
    fused_linear_divergence,
    triton_phases,
    vocab_parallel_divergence,
)

triton_phases.BLOCK = 64
FAILS: list[str] = []


def report(name: str, got, ref, tol: float) -> None:
    err = max(((g.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)).item()
              for g, r in zip(got, ref))  # fmt: skip
    ok = err <= tol
    print(f"{name:<58} max rel err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
    if not ok:
        FAILS.append(name)


def kernels(dtype, tol) -> None:
    g = torch.Generator().manual_seed(0)
    c, v = 5, 300
    ls = (torch.randn(c, v, generator=g) * 3).to(dtype)
    lt = (ls.float() + torch.randn(c, v, generator=g)).to(dtype)
    inv_t = 1 / 1.1
    l64, t64 = ls.double(), lt.double()
    scale = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        for clip in (None, 0.05):
            name = f"{str(dtype)[6:]} {kind} clip={clip}"
            st_ref = _phase_math.phase_stats(l64, t64, inv_t)
            shift_ref = st_ref[:, 0] + torch.log(st_ref[:, 1])
            st = triton_phases.stats(ls, lt, inv_t)
            report(f"{name}: stats -> log-sum-exp", [st[:, 0] + torch.log(st[:, 1])], [shift_ref], 1e-5)
            shift = shift_ref.float()
            ref = _phase_math.phase_terms(l64, t64, shift_ref, inv_t, kind, 0.3, clip, True)
            got = triton_phases.terms(ls, lt, shift, inv_t, kind, 0.3, clip, True)
            report(f"{name}: terms (loss, sum m h, clipped, H_S, H_T)", list(got), list(ref), tol)
            saved_ref = torch.cat([shift_ref, ref[1:2]])
            g_ref = torch.empty_like(l64)
            _phase_math.phase_grad_(l64, t64, saved_ref, scale, inv_t, kind, 0.3, clip, g_ref)
            out = torch.empty(c, v + 7, dtype=dtype)[:, :v]  # a strided output, as vocab_parallel's
            triton_phases.grad_(ls, lt, saved_ref.float(), scale.float(), inv_t, kind, 0.3, clip, out)
            report(f"{name}: grad from saved", [out], [g_ref], tol)
            own = ls.clone()
            parts = triton_phases.terms_grad_(own, lt, shift, inv_t, kind, 0.3, clip)
            g1 = torch.empty_like(l64)
            _phase_math.phase_grad_(
                l64, t64, saved_ref, torch.ones(c, dtype=torch.float64), inv_t, kind, 0.3, clip, g1
            )
            got, want = [parts[0], parts[1], own], [ref[0], ref[1], g1]
            report(f"{name}: terms+grad (single rank, in place)", got, want, tol)


def shards() -> None:
    """Three vocabulary shards of unequal width, combined as the TP collectives do (all-gather of the
    (max, sum-exp) pairs, all-reduce SUM of the terms), against the float64 full-vocabulary reference."""
    g = torch.Generator().manual_seed(4)
    c, v = 6, 350
    ls = torch.randn(c, v, generator=g) * 3
    lt = ls + torch.randn(c, v, generator=g)
    l64, t64 = ls.double(), lt.double()
    inv_t = 1 / 1.1
    bounds = [(0, 120), (120, 300), (300, 350)]
    for kind, clip in (("forward_kl", 0.05), ("jsd", None)):
        st = torch.stack([triton_phases.stats(ls[:, a:b].contiguous(), lt[:, a:b].contiguous(), inv_t)
                          for a, b in bounds])  # (tp, 2, 2, c)  # fmt: skip
        m = st[:, :, 0].amax(0)
        shift = m + torch.log((st[:, :, 1] * torch.exp(st[:, :, 0] - m)).sum(0))
        parts = sum(triton_phases.terms(ls[:, a:b].contiguous(), lt[:, a:b].contiguous(), shift, inv_t, kind,
                                        0.3, clip, False) for a, b in bounds)  # fmt: skip
        st64 = _phase_math.phase_stats(l64, t64, inv_t)
        shift64 = st64[:, 0] + torch.log(st64[:, 1])
        ref = _phase_math.phase_terms(l64, t64, shift64, inv_t, kind, 0.3, clip, False)
        saved = torch.cat([shift, parts[1:2]])
        g_ref = torch.empty_like(l64)
        ones = torch.ones(c, dtype=torch.float64)
        _phase_math.phase_grad_(l64, t64, torch.cat([shift64, ref[1:2]]), ones, inv_t, kind, 0.3, clip, g_ref)
        grads = []
        for a, b in bounds:
            out = torch.empty(c, b - a)
            triton_phases.grad_(ls[:, a:b].contiguous(), lt[:, a:b].contiguous(), saved, ones.float(), inv_t,
                                kind, 0.3, clip, out)  # fmt: skip
            grads.append(out)
        report(f"3 shards {kind} clip={clip}: shift, loss, sum m h, grad", [shift, parts[0], parts[1],
               torch.cat(grads, 1)], [shift64, ref[0], ref[1], g_ref], 1e-5)  # fmt: skip


def fused() -> None:
    """fused_linear_divergence through the kernels (both backward paths, masked tokens, vocabulary padding)
    against autograd through vocab_parallel_divergence on float64 logits."""
    g = torch.Generator().manual_seed(1)
    t, h, v, pad = 14, 24, 203, 5
    hs = torch.randn(t, h, generator=g)
    ht = hs + 0.5 * torch.randn(t, h, generator=g)
    ws = torch.cat([torch.randn(v, h, generator=g) * 0.6, torch.randn(pad, h, generator=g) * 5])
    wt = ws + 0.3 * torch.randn(v + pad, h, generator=g)
    mask = torch.ones(t, dtype=torch.bool)
    mask[[0, 6, 13]] = False
    for kind, clip in (("forward_kl", 0.05), ("reverse_kl", None), ("jsd", 0.02)):
        for mode in ("uniform", "weighted"):
            go = torch.full((t,), 1 / 11.0) if mode == "uniform" else torch.rand(t, generator=g) + 0.2
            kw = dict(kind=kind, beta=0.3, temperature=1.1, clip=clip, loss_mask=mask, vocab_size=v)
            x = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
            loss = fused_linear_divergence(x[0], x[1], ht, wt, chunk_size=4, **kw)
            (loss * go).sum().backward()
            r = [hs.double().requires_grad_(True), ws.double().requires_grad_(True)]
            ref = vocab_parallel_divergence(r[0] @ r[1].t(), ht.double() @ wt.double().t(), **kw)
            (ref * go.double()).sum().backward()
            report(f"fused fp32 {kind} clip={clip} {mode}: loss, dh, dW", [loss, x[0].grad, x[1].grad],
                   [ref, r[0].grad, r[1].grad], 1e-5)  # fmt: skip
    # an unsupported dtype (float64) falls back to the torch phases, still exact
    why = triton_phases.supported(hs.double(), hs.double(), "forward_kl")
    print(f"float64 chunks: kernels decline ({why})")
    if why is None:
        FAILS.append("float64 not declined")


def main() -> int:
    torch.set_num_threads(1)
    kernels(torch.float32, 1e-5)
    kernels(torch.bfloat16, 1e-2)  # bf16 tolerance (the gradient is stored in bf16)
    shards()
    fused()
    print("FAIL: " + ", ".join(FAILS) if FAILS else "PASS")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
