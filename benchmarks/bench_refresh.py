"""Weight refresh cost: bucketed `push_weights` into a rollout engine vs a plain copy of the same bytes.

    .venv/bin/python benchmarks/bench_refresh.py                     # vLLM (CPU here), ~100 MB fp32 model
    .venv/bin/python benchmarks/bench_refresh.py --engine hf --layers 4 --hidden 256
    .venv/bin/python benchmarks/bench_refresh.py --experts 16 --hidden 256    # Qwen3-MoE (all layers sparse)
    .venv/bin/python benchmarks/bench_refresh.py --smoke   # 1 layer, hidden 64, one bucket size, no TP table

Builds a Qwen3-architecture model with random weights (tokenizer from opsd_megatron.demo.tiny), starts one
engine,
then for several bucket sizes streams perturbed copies of all weights into it (freshly materialised per
tensor, as `export_hf_weights` does) and reports: refresh time, throughput, buckets, the peak of streamed
bytes alive at once (tracked with weakref finalizers = the extra memory a refresh holds), and the time of a
plain `copy_` of the same tensors into preallocated (pre-touched) buffers on the same machine, with the ratio
refresh / copy (median over repeats of pairs timed back to back). "engine ms" is the time inside
`update_weights`; the rest is producing the tensors. Engine start-up time is printed too. Timings are the
minimum of `--repeats` runs (CPU timings are noisy on shared machines).

Engine tensor parallelism (`--engine-tp 1,2`, on by default): for each engine TP a world of 2 gloo ranks
holds the model as Megatron TP 2 and refreshes its engine(s) from the real export stream (`WeightSyncer` over
`export_hf_weights`: TP all-gather, buckets, `update_weights`): two TP-1 engines (one per rank) or one TP-2
engine over both ranks. Per rank it reports the bytes gathered by the export collectives, the bytes streamed
into the engine (full tensors: vLLM's loaders cut the shard), the bytes the engine holds afterwards (read back
from vLLM, `held_shapes`), the refresh time (export + load) and a plain `copy_` of the same bytes timed in
the same process. Exits non-zero when an engine-TP-2 rank holds more than 0.6x what a TP-1 engine holds (each
rank must keep only its shard) or a refresh held more than one bucket + one decoder layer at once.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import weakref
from pathlib import Path

import torch


def build_model(out: Path, layers: int, hidden: int, experts: int = 0) -> Path:
    """A random Qwen3 model; with `experts` > 0 a Qwen3-MoE (top-2, expert intermediate = hidden, every layer
    sparse), so a decoder layer carries all its experts (refreshed together: one vLLM module)."""
    from opsd_megatron.demo.tiny import make_tiny_hf_model

    shape = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
    )
    if experts:
        moe = dict(
            num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=hidden, mlp_only_layers=[]
        )
        shape.update(moe)
    return make_tiny_hf_model(out, "qwen3_moe" if experts else "qwen3", **shape)


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


def _tp_worker(rank: int, world: int, port: int, model_dir: str, etp: int, bucket_mb: float, repeats: int,
               out_dir: str) -> None:  # fmt: skip
    """One rank of the engine-TP comparison (spawned): Megatron TP=world, engine TP=etp, timed refreshes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import export_hf_weights, load_hf_weights
    from opsd_megatron.mcore.models import build_model
    from opsd_megatron.rollout import make_engine
    from opsd_megatron.rollout.refresh import WeightSyncer

    parallel.initialize(tp=world, pp=1, seed=0)
    chunks = build_model(model_dir, torch.float32, perform_initialization=False)
    load_hf_weights(chunks, model_dir)
    local = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    exported = [(n, t.clone()) for n, t in export_hf_weights(chunks)]  # the same bytes, for the plain copy
    full = sum(t.numel() * t.element_size() for _, t in exported)
    layer = max(
        sum(t.numel() * t.element_size() for n, t in exported if f".layers.{i}." in n) for i in range(2)
    )
    dst = [torch.zeros_like(t) for _, t in exported]
    engine = make_engine("vllm", model_dir, dtype="float32", seed=0, max_model_len=256,
                         tensor_parallel_size=etp, gpu_memory_utilization=0.05)  # fmt: skip
    syncer = WeightSyncer(engine, bucket_bytes=int(bucket_mb * 2**20))
    secs, exports, loads, copies, peak = [], [], [], [], 0
    for _ in range(repeats):
        copies.append(plain_copy_seconds(exported, dst))
        dist.barrier()
        stats = syncer.sync(chunks)
        secs.append(stats.seconds)
        exports.append(stats.export_seconds)
        loads.append(stats.load_seconds)
        peak = max(peak, stats.max_bucket_bytes)
    held = sum(math.prod(s) * 4 for s in engine.held_shapes().values())
    engine.close()
    torch.save(dict(rank=rank, etp=etp, gathered=full - local, into_engine=stats.bytes, held=held,
                    refresh=min(secs), export=min(exports), load=min(loads), copy=min(copies), peak=peak,
                    limit=int(bucket_mb * 2**20) + layer),
               Path(out_dir) / f"etp{etp}_rank{rank}.pt")  # fmt: skip
    parallel.destroy()


def engine_tp_table(model_dir: Path, etps: list[int], bucket_mb: float, repeats: int) -> bool:
    """Run the engine-TP comparison (one spawned world of 2 per engine TP); print it; True when it passes."""
    import socket

    import torch.multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_refresh_tp_") as out:
        for etp in etps:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            mp.start_processes(_tp_worker, args=(2, port, str(model_dir), etp, bucket_mb, repeats, out),
                               nprocs=2, start_method="spawn")  # fmt: skip
            rows += [torch.load(Path(out) / f"etp{etp}_rank{r}.pt") for r in range(2)]
    mib = 2**20
    print(f"\nengine TP (world 2, Megatron TP 2, bucket {bucket_mb:g} MiB, fp32): per rank")
    head = ("eng TP", "rank", "gathered MiB", "into eng MiB", "held MiB", "refresh ms", "export ms",
            "load ms", "copy ms", "refresh/copy", "peak MiB")  # fmt: skip
    print(" ".join(f"{h:>12}" for h in head))
    for r in rows:
        print(f"{r['etp']:>12} {r['rank']:>12} {r['gathered'] / mib:>12.1f} {r['into_engine'] / mib:>12.1f} "
              f"{r['held'] / mib:>12.1f} {r['refresh'] * 1e3:>12.1f} {r['export'] * 1e3:>12.1f} "
              f"{r['load'] * 1e3:>12.1f} {r['copy'] * 1e3:>12.1f} {r['refresh'] / r['copy']:>12.1f} "
              f"{r['peak'] / mib:>12.1f}")  # fmt: skip
    ok = True
    held1 = [r["held"] for r in rows if r["etp"] == 1]
    for r in rows:
        if r["peak"] > r["limit"]:
            print(
                f"FAIL: engine TP {r['etp']} rank {r['rank']} held {r['peak']} B at once > one bucket + layer"
            )
            ok = False
        if held1 and r["etp"] > 1 and r["held"] > 0.6 * max(held1):
            print(
                f"FAIL: engine TP {r['etp']} rank {r['rank']} holds {r['held']} B, not a shard of "
                f"{max(held1)} B"
            )
            ok = False
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--buckets-mb", default="1,8,64,1024", help="comma-separated bucket sizes in MiB")
    ap.add_argument(
        "--engine-tp", default="1,2", help="engine TP sizes to compare in a world of 2 ('' skips)"
    )
    ap.add_argument("--tp-bucket-mb", type=float, default=8.0, help="bucket size of the engine-TP comparison")
    ap.add_argument(
        "--experts", type=int, default=0, help="> 0: a Qwen3-MoE with this many experts per layer"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model, one bucket size, no engine-TP table")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.repeats, args.buckets_mb, args.engine_tp = 1, 64, 1, "1", ""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from opsd_megatron.rollout import make_engine
    from opsd_megatron.rollout.refresh import push_weights

    with tempfile.TemporaryDirectory(prefix="bench_refresh_") as tmp:
        model_dir = build_model(Path(tmp) / "model", args.layers, args.hidden, args.experts)
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
        etps = [int(x) for x in args.engine_tp.split(",") if x.strip()]
        ok = engine_tp_table(model_dir, etps, args.tp_bucket_mb, args.repeats) if etps else True

    arch = f"Qwen3-MoE, {args.experts} experts" if args.experts else "Qwen3"
    print(f"\nengine={args.engine}  model={arch}, {total / 2**20:.1f} MiB fp32 ({len(source)} tensors)  "
          f"startup={startup:.1f} s  torch threads={torch.get_num_threads()}")  # fmt: skip
    print(f"plain copy_ of the same tensors: {copy_s * 1e3:.1f} ms ({total / copy_s / 1e9:.2f} GB/s)\n")
    head = ("bucket MiB", "buckets", "refresh ms", "engine ms", "GB/s", "peak live MiB", "refresh/copy")
    print(f"{head[0]:>10} {head[1]:>8} {head[2]:>11} {head[3]:>10} {head[4]:>7} {head[5]:>14} {head[6]:>13}")
    for mb, nb, s, load, gbps, peak, ratio in rows:
        ms, load_ms = s * 1e3, load * 1e3
        print(f"{mb:>10g} {nb:>8d} {ms:>11.1f} {load_ms:>10.1f} {gbps:>7.2f} {peak:>14.1f} {ratio:>13.1f}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
