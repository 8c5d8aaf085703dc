"""Benchmark of the self-distillation loss over the LM head: time and peak extra memory, printed as a table.

    .venv/bin/python benchmarks/bench_loss.py                  # CPU: 2048 x 512 x 32000 fp32, RSS per variant
    python3 benchmarks/bench_loss.py                           # GPU (auto): 8192 x 4096 x 151936 bf16
    python3 benchmarks/bench_loss.py --tokens 4096 --vocab 32000 --hidden 512

Timed work (as docs/performance.md): student forward + teacher forward + backward to the student hidden states
and the LM-head weight; forward KL KL(p_T || p_S), temperature 1.1, pointwise clip 0.05 unless the row says
otherwise. Variants: `floor` = the 4 plain GEMMs of these shapes (arithmetic floor), `naive` = full [T, V]
fp32 log-softmax in PyTorch, `liger` = Liger-Kernel's LigerFusedLinearJSD(jsd_beta=0) (no clip; GPU, when
importable), `unfused` = ours on full logits, `fused` = ours from hidden states (`fused_linear_divergence`).
GPU: CUDA events, median of 5 after 2 warm-ups (the first warm-up compiles the Triton kernels), peak =
max_memory_allocated above the inputs. CPU: median of `--repeat` after one warm-up, each variant in its own
subprocess, peak = peak RSS above the RSS after building the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

TEMPERATURE, CLIP = 1.1, 0.05


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hs = rnd(n, h)
    ws = rnd(v, h, scale=2.0 / h**0.5)
    ht = (hs.float() + rnd(n, h, scale=0.3).float()).to(dtype)
    wt = (ws.float() + rnd(v, h, scale=0.5 / h**0.5).float()).to(dtype)
    return hs.requires_grad_(True), ws.requires_grad_(True), ht, wt


def run_floor(hs, ws, ht, wt):
    with torch.no_grad():
        ls = hs @ ws.t()  # (T, V): the student logits, reused as their own gradient stand-in
        lt = ht @ wt.t()
        gh = ls @ ws
        gw = ls.t() @ hs
    return (lt[0, 0] + gh[0, 0] + gw[0, 0]).float()


def run_naive(hs, ws, ht, wt, clip=CLIP):
    ls = (hs @ ws.t()).float() / TEMPERATURE
    with torch.no_grad():
        lpt = torch.log_softmax((ht @ wt.t()).float() / TEMPERATURE, -1)
    terms = lpt.exp() * (lpt - torch.log_softmax(ls, -1))
    if clip is not None:
        terms = terms.clamp(max=clip)
    loss = terms.sum() / hs.shape[0]
    loss.backward()
    return loss.detach()


def run_liger(hs, ws, ht, wt):
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)(hs, ws, ht, wt, None)
    loss.backward()
    return loss.detach()


def run_unfused(hs, ws, ht, wt, clip=CLIP):
    from opsd_megatron.losses import token_mean, vocab_parallel_divergence

    with torch.no_grad():
        lt = ht @ wt.t()
    per_tok = vocab_parallel_divergence(
        hs @ ws.t(), lt, kind="forward_kl", temperature=TEMPERATURE, clip=clip
    )
    loss = token_mean(per_tok, None, hs.shape[0])
    loss.backward()
    return loss.detach()


def run_fused(hs, ws, ht, wt, clip=CLIP, kind="forward_kl"):
    from opsd_megatron.losses import fused_linear_divergence, token_mean

    per_tok = fused_linear_divergence(hs, ws, ht, wt, kind=kind, beta=0.5, temperature=TEMPERATURE, clip=clip)
    loss = token_mean(per_tok, None, hs.shape[0])
    loss.backward()
    return loss.detach()


VARIANTS = {
    "floor (4 GEMMs)": run_floor,
    "naive, clip": run_naive,
    "naive, no clip": lambda *a: run_naive(*a, clip=None),
    "liger jsd_beta=0 (no clip)": run_liger,
    "ours unfused, clip": run_unfused,
    "ours fused, clip": run_fused,
    "ours fused, no clip": lambda *a: run_fused(*a, clip=None),
    "ours fused, reverse KL clip": lambda *a: run_fused(*a, kind="reverse_kl"),
    "ours fused, JSD(0.5) clip": lambda *a: run_fused(*a, kind="jsd"),
}
CPU_VARIANTS = ["floor (4 GEMMs)", "naive, clip", "ours unfused, clip", "ours fused, clip"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_cpu(name, n, h, v, repeat):
    """In this (fresh) process: median seconds and peak RSS above the inputs, as a dict."""
    inp = make_inputs(n, h, v, torch.float32, "cpu")
    base = _rss_bytes()
    times, val = [], None
    for i in range(repeat + 1):
        for x in inp[:2]:
            x.grad = None
        t0 = time.perf_counter()
        val = VARIANTS[name](*inp)
        if i:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"ms": 1e3 * statistics.median(times), "gib": max(peak - base, 0) / 2**30, "loss": float(val)}


def measure_gpu(name, inp, warmup=2, repeat=5):
    times, val = [], None
    torch.cuda.synchronize()
    for i in range(warmup + repeat):
        for x in inp[:2]:
            x.grad = None
        torch.cuda.synchronize()
        if i == warmup:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        val = VARIANTS[name](*inp)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() - base
    for x in inp[:2]:
        x.grad = None
    return {"ms": statistics.median(times), "gib": peak / 2**30, "loss": float(val)}


def print_table(title, rows):
    floor = rows.get("floor (4 GEMMs)", {}).get("ms")
    naive = rows.get("naive, clip", {}).get("ms")
    liger = rows.get("liger jsd_beta=0 (no clip)", {}).get("ms")
    print(f"\n{title}")
    hdr = f"{'variant':<30} {'time ms':>9} {'x floor':>8} {'x naive':>8} {'x liger':>8} {'peak GiB':>9}"
    hdr += f" {'loss':>10}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<30} skipped: {r['error']}")
            continue

        def ratio(ref, r=r):
            return f"{r['ms'] / ref:8.2f}" if ref else f"{'-':>8}"

        loss = "-" if name.startswith("floor") else f"{r['loss']:10.6f}"
        print(
            f"{name:<30} {r['ms']:9.1f} {ratio(floor)} {ratio(naive)} {ratio(liger)} "
            f"{r['gib']:9.2f} {loss:>10}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--repeat", type=int, default=2, help="CPU timed repeats (GPU: 5)")
    ap.add_argument("--variants", help="semicolon-separated subset of the variant names")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    n = args.tokens or (8192 if cuda else 2048)
    h = args.hidden or (4096 if cuda else 512)
    v = args.vocab or (151_936 if cuda else 32_000)
    if args._child:  # CPU: one variant per fresh process, so that peak RSS is its own
        print(json.dumps(measure_cpu(args._child, n, h, v, args.repeat)))
        return
    names = args.variants.split(";") if args.variants else (list(VARIANTS) if cuda else CPU_VARIANTS)
    rows = {}
    if cuda:
        dev = torch.cuda.get_device_name()
        inp = make_inputs(n, h, v, torch.bfloat16, "cuda")
        for name in names:
            try:
                rows[name] = measure_gpu(name, inp)
            except Exception as e:  # e.g. liger-kernel not importable
                rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
            print(f"  done {name}: {rows[name]}", file=sys.stderr, flush=True)
        title = f"GPU {dev}, torch {torch.__version__}: {n} tokens x {h} hidden x {v} vocab, bf16"
    else:
        for name in names:
            cmd = [sys.executable, __file__, "--device", "cpu", "--tokens", str(n), "--hidden", str(h)]
            cmd += ["--vocab", str(v), "--repeat", str(args.repeat), "--_child", name]
            out = subprocess.run(cmd, capture_output=True, text=True)
            try:
                rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                rows[name] = {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:100]}
            print(f"  done {name}: {rows[name]}", file=sys.stderr, flush=True)
        title = f"CPU ({os.cpu_count()} cores), torch {torch.__version__}: {n} x {h} x {v} vocab, fp32"
    print_table(title + f", T={TEMPERATURE}, clip {CLIP} where stated", rows)
    if cuda:
        from opsd_megatron.losses import _phases

        print(f"compiled phases: { {f.__name__: c is not False for f, c in _phases._COMPILED.items()} }")


if __name__ == "__main__":
    main()
