"""GPU correctness check of the fused loss (Triton kernels, torch.compile phases) against the eager path.

    python3 benchmarks/gpu_loss_check.py      # needs CUDA; prints one line per case and PASS/FAIL (exit 0/1)
    .venv/bin/python benchmarks/gpu_loss_check.py --smoke   # CPU, tiny shape: the script's own code paths

Small shape (1000 tokens x 256 hidden x 5003 vocab, 20% masked), fp32 and bf16, forward KL / reverse KL /
JSD(0.5) with clip, token-mean (uniform) and per-token-weighted incoming gradients (both backward paths).
fp32: fused and unfused (Triton kernels; torch.compile phases for forward KL, the fallback, whose compilation
is slow) vs unfused eager; bf16: each fast path
vs its own eager run. Fails also when a kernel or compilation fell back (it would be logged, not raised).
`--smoke` (make test): the same comparisons on CPU at 48 x 32 x 257, fp32 only, without the compiled phases
(on CPU every mode runs the CPU path: this checks the script, not the kernels).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from opsd_megatron.losses import _phases, fused_linear_divergence, vocab_parallel_divergence


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, fp32, no compiled phases")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("FAIL: no CUDA device (this check needs one GPU, or --smoke)")
        return 1
    dev = "cpu" if args.smoke else "cuda"
    g = torch.Generator().manual_seed(0)
    n, h, v = (48, 32, 257) if args.smoke else (1000, 256, 5003)
    ok = True
    cases = ((torch.float32, 2e-4),) if args.smoke else ((torch.float32, 2e-4), (torch.bfloat16, 2e-2))
    for dtype, tol in cases:
        hs = torch.randn(n, h, generator=g).to(dev, dtype)
        ws = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(dev, dtype)
        ht = (hs.float() + 0.3 * torch.randn(n, h, generator=g).to(dev)).to(dtype)
        wt = (ws.float() + 0.5 / h**0.5 * torch.randn(v, h, generator=g).to(dev)).to(dtype)
        mask = (torch.rand(n, generator=g) > 0.2).to(dev)
        for kind in ("forward_kl", "reverse_kl", "jsd"):
            for mode in ("uniform", "weighted"):
                go = torch.full((n,), 1.0 / n) if mode == "uniform" else torch.rand(n, generator=g)
                go = go.to(dev)
                kw = dict(kind=kind, beta=0.5, temperature=1.1, clip=0.05, loss_mask=mask)

                def run(fused, mode, kw=kw, go=go, inp=(hs, ws, ht, wt)):
                    hs, ws, ht, wt = inp
                    os.environ["OPSD_LOSS_TRITON"] = "1" if mode == "triton" else "0"
                    os.environ["OPSD_LOSS_COMPILE"] = "1" if mode == "compile" else "0"
                    x = [t.clone().requires_grad_(True) for t in (hs, ws)]
                    if fused:
                        loss = fused_linear_divergence(x[0], x[1], ht, wt, chunk_size=384, **kw)
                    else:
                        loss = vocab_parallel_divergence(x[0] @ x[1].t(), ht @ wt.t(), **kw)
                    (loss * go).sum().backward()
                    os.environ["OPSD_LOSS_COMPILE"] = os.environ["OPSD_LOSS_TRITON"] = "1"
                    return [loss, x[0].grad, x[1].grad]

                # fp32: the fast paths vs the unfused eager path; bf16 (GEMMs round differently per
                # chunk): each fast path vs its own eager run
                pairs = []
                fasts = ("triton", "compile") if kind == "forward_kl" and not args.smoke else ("triton",)
                for fast in fasts:  # compile: slow
                    pairs.append((f"fused/{fast}", run(True, fast), run(dtype != torch.float32, "eager")))
                    pairs.append((f"unfused/{fast}", run(False, fast), run(False, "eager")))
                for name, got, ref in pairs:
                    errs = [((x - y).abs().max() / y.abs().max()).item() for x, y in zip(got, ref)]
                    good = max(errs) < tol
                    ok &= good
                    print(f"{str(dtype):15} {kind:11} {mode:8} {name:16} rel.err loss/dh/dW = {errs[0]:.1e} "
                          f"{errs[1]:.1e} {errs[2]:.1e} {'ok' if good else 'FAIL'}")  # fmt: skip
    status = _phases.compiled_status()
    print(f"phases: {status}")
    if status["failed"]:
        print("FAIL: a Triton kernel or a compiled phase fell back to eager (see the logged exception)")
        ok = False
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
