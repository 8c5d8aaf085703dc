"""Weight refresh cost: bucketed `push_weights` into a rollout engine vs a plain copy of the same bytes.

    .venv/bin/python benchmarks/bench_refresh.py                     # vLLM (CPU here), ~100 MB fp32 model
    .venv/bin/python benchmarks/bench_refresh.py --engine hf --layers 4 --hidden 256

Builds a Qwen3-architecture model with random weights (tokenizer from opsd_megatron.tiny), starts one engine,
then for several bucket sizes streams perturbed copies of all weights into it (freshly materialised per
tensor, as `export_hf_weights` does) and reports: refresh time, throughput, buckets, the peak of streamed
bytes alive at once (tracked with weakref finalizers = the extra memory a refresh holds), and the time of a
plain `copy_` of the same tensors into preallocated (pre-touched) buffers on the same machine, with the ratio
refresh / copy (median over repeats of pairs timed back to back). "engine ms" is the time inside
`update_weights`; the rest is producing the tensors. Engine start-up time is printed too. Timings are the
minimum of `--repeats` runs (CPU timings are noisy on shared machines).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import torch


def build_model(out: Path, layers: int, hidden: int) -> Path:
    from opsd_megatron.tiny import make_tiny_hf_model

    return make_tiny_hf_model(
        out,
        "qwen3",
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
    )


def stream(source, live):
    """Yield fresh copies (like an export) and track the bytes alive at once in live['now'/'peak']."""

    def release(n):
        live["now"] -= n

    for name, t in source:
        fresh = t.clone()
        n = fresh.numel() * fresh.element_size()
        live["now"] += n
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(fresh, release, n)
        yield name, fresh


def plain_copy_seconds(source, dst) -> float:
    """One timed `copy_` of every source tensor into its preallocated, already touched buffer."""
    t0 = time.perf_counter()
    for d, (_, t) in zip(dst, source):
        d.copy_(t)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--buckets-mb", default="1,8,64,1024", help="comma-separated bucket sizes in MiB")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from opsd_megatron.rollout import make_engine
    from opsd_megatron.weight_sync import push_weights

    with tempfile.TemporaryDirectory(prefix="bench_refresh_") as tmp:
        model_dir = build_model(Path(tmp) / "model", args.layers, args.hidden)
        from safetensors.torch import load_file

        base = load_file(str(model_dir / "model.safetensors"))
        source = [(n, t + 0.01 * torch.randn_like(t)) for n, t in base.items()]
        total = sum(t.numel() * t.element_size() for _, t in source)
        t0 = time.perf_counter()
        engine = make_engine(args.engine, model_dir, dtype="float32", seed=0, max_model_len=256)
        startup = time.perf_counter() - t0
        dst = [torch.zeros_like(t) for _, t in source]  # touched: no page faults in the timed copies
        rows, copies = [], []
        for mb in [float(x) for x in args.buckets_mb.split(",")]:
            secs, loads, peaks, ratios, stats = [], [], [], [], None
            for _ in range(args.repeats):
                copy_s = plain_copy_seconds(source, dst)  # interleaved: both see the same machine load
                copies.append(copy_s)
                live = {"now": 0, "peak": 0}
                stats = push_weights(stream(source, live), engine, bucket_bytes=int(mb * 2**20))
                secs.append(stats.seconds)
                loads.append(stats.load_seconds)
                peaks.append(live["peak"])
                ratios.append(stats.seconds / copy_s)
            s = min(secs)
            ratio = statistics.median(ratios)
            rows.append((mb, stats.buckets, s, min(loads), total / s / 1e9, max(peaks) / 2**20, ratio))
        copy_s = min(copies)
        engine.close()

    print(f"\nengine={args.engine}  model={total / 2**20:.1f} MiB fp32 ({len(source)} tensors)  "
          f"startup={startup:.1f} s  torch threads={torch.get_num_threads()}")  # fmt: skip
    print(f"plain copy_ of the same tensors: {copy_s * 1e3:.1f} ms ({total / copy_s / 1e9:.2f} GB/s)\n")
    head = ("bucket MiB", "buckets", "refresh ms", "engine ms", "GB/s", "peak live MiB", "refresh/copy")
    print(f"{head[0]:>10} {head[1]:>8} {head[2]:>11} {head[3]:>10} {head[4]:>7} {head[5]:>14} {head[6]:>13}")
    for mb, nb, s, load, gbps, peak, ratio in rows:
        ms, load_ms = s * 1e3, load * 1e3
        print(f"{mb:>10g} {nb:>8d} {ms:>11.1f} {load_ms:>10.1f} {gbps:>7.2f} {peak:>14.1f} {ratio:>13.1f}")


if __name__ == "__main__":
    main()
