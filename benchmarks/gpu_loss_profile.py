"""Profile the fused loss on the GPU shape of docs/performance.md: CUDA time per kernel, and the effect of
the chunk size on time and peak memory.

    python3 benchmarks/gpu_loss_profile.py [chunk sizes...]
    .venv/bin/python benchmarks/gpu_loss_profile.py --smoke   # CPU, 64 x 32 x 1024: the script's code paths
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_loss  # noqa: E402
from bench_loss import make_inputs, measure_gpu, run_fused  # noqa: E402


def main() -> None:
    smoke = "--smoke" in sys.argv[1:]
    cuda = torch.cuda.is_available() and not smoke
    if not cuda and not smoke:
        raise SystemExit("FAIL: no CUDA device (this profile needs one GPU, or --smoke)")
    n, h, v = (8192, 4096, 151_936) if cuda else (64, 32, 1024)
    inp = make_inputs(n, h, v, torch.bfloat16 if cuda else torch.float32, "cuda" if cuda else "cpu")
    chunks = [int(c) for c in sys.argv[1:] if c != "--smoke"] or ([None] if cuda else [None, 16])
    for c in chunks:
        bench_loss.VARIANTS["chunk"] = lambda *a, c=c: _fused_chunk(*a, chunk=c)
        print(f"chunk {c}: {measure_gpu('chunk', inp) if cuda else _measure_cpu(inp)}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    act = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[act]) as prof:
        for x in inp[:2]:
            x.grad = None
        run_fused(*inp)
        if cuda:
            torch.cuda.synchronize()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=22 if cuda else 8, max_name_column_width=70))


def _measure_cpu(inp, repeat: int = 2) -> dict:
    """CPU stand-in of `measure_gpu` (smoke): median ms of `repeat` runs after one warm-up, and the loss."""
    times, val = [], None
    for i in range(repeat + 1):
        for x in inp[:2]:
            x.grad = None
        t0 = time.perf_counter()
        val = bench_loss.VARIANTS["chunk"](*inp)
        if i:
            times.append(1e3 * (time.perf_counter() - t0))
    return {"ms": statistics.median(times), "loss": float(val)}


def _fused_chunk(hs, ws, ht, wt, chunk):
    from opsd_megatron.losses import fused_linear_divergence, token_mean

    per_tok = fused_linear_divergence(hs, ws, ht, wt, temperature=1.1, clip=0.05, chunk_size=chunk)
    loss = token_mean(per_tok, None, hs.shape[0])
    loss.backward()
    return loss.detach()


if __name__ == "__main__":
    main()
