"""Profile the fused loss on the GPU shape of docs/performance.md: CUDA time per kernel, and the effect of
the chunk size on time and peak memory.

    python3 benchmarks/gpu_loss_profile.py [chunk sizes...]
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_loss  # noqa: E402
from bench_loss import make_inputs, measure_gpu, run_fused  # noqa: E402


def main() -> None:
    n, h, v = 8192, 4096, 151_936
    inp = make_inputs(n, h, v, torch.bfloat16, "cuda")
    chunks = [int(c) for c in sys.argv[1:]] or [None]
    for c in chunks:
        bench_loss.VARIANTS["chunk"] = lambda *a, c=c: _fused_chunk(*a, chunk=c)
        print(f"chunk {c}: {measure_gpu('chunk', inp)}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for x in inp[:2]:
            x.grad = None
        run_fused(*inp)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))


def _fused_chunk(hs, ws, ht, wt, chunk):
    from opsd_megatron.losses import fused_linear_divergence, token_mean

    per_tok = fused_linear_divergence(hs, ws, ht, wt, temperature=1.1, clip=0.05, chunk_size=chunk)
    loss = token_mean(per_tok, None, hs.shape[0])
    loss.backward()
    return loss.detach()


if __name__ == "__main__":
    main()
