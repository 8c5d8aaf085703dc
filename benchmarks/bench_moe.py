"""One MoE training step (forward + backward) on Megatron-core per expert-parallel size: time and memory.

    .venv/bin/python benchmarks/bench_moe.py                      # CPU: 4 gloo ranks, EP 1, 2, 4
    .venv/bin/python benchmarks/bench_moe.py --world 2 --ep 1,2   # smaller
    torchrun-free GPU run (a lent GPU node, N GPUs):  python benchmarks/bench_moe.py --gpu --world N --ep 1,N
    .venv/bin/python benchmarks/bench_moe.py --smoke              # 1 rank in this process, tiny (make test)

A Qwen3-MoE model with random weights (CPU default: hidden 256, 16 experts, top-2, 4 layers; `--gpu`: the
Qwen3-30B-A3B layer shape `opsd_megatron.demo.tiny.QWEN3_30B_A3B_SHAPE` — 128 experts, top-8, hidden 2048 —
with
`--layers` of its 48 layers, bf16) is built at every EP size on the same `--world` processes (DP = world, EP
carved out of it; each rank its own `--batch` x `--seq` tokens). Per EP size: experts per rank, parameter
MB per rank (expert weights shrink with EP), median step seconds over `--steps` after one warm-up, global
tokens/s, its ratio to EP1 measured in the same run, peak memory per rank (CUDA: max allocated; CPU: max RSS
growth). Exit status 1 on an exception, a non-finite loss, parameter memory per rank that does not shrink
with EP, or tokens/s below `--min-ratio` x EP1 (CPU default 0.25: the CPU path all-gathers every token to
every EP rank and runs experts one after another, so EP buys memory, not speed, on 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rank_main(rank: int, world: int, port: int, args: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    try:
        rows = _measure(rank, args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def _one_rank(port: int, args: dict, out_dir: str) -> None:
    """World 1 in this process: `_rank_main`'s work, raising instead of exiting."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # fmt: skip
    try:
        Path(out_dir, "rank0.json").write_text(json.dumps(_measure(0, args)))
    except BaseException:
        Path(out_dir, "rank0.err").write_text(traceback.format_exc())
        raise


def _measure(rank: int, args: dict) -> list[dict]:
    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.models import build_model

    gpu = args["gpu"]
    dtype = torch.bfloat16 if gpu else torch.float32
    b, s = args["batch"], args["seq"]
    rows = []
    for ep in args["eps"]:
        parallel.initialize(1, 1, seed=1, ep=ep)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        rss0 = _rss_mb()
        chunks = build_model(args["model_dir"], dtype=dtype)
        model = chunks[0]
        param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        gen = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, args["vocab"], (b, s), generator=gen)
        labels = torch.randint(0, args["vocab"], (b, s), generator=gen)
        pos = torch.arange(s).expand(b, s)
        if gpu:
            ids, labels, pos = ids.cuda(), labels.cuda(), pos.cuda()
        times, loss = [], float("nan")
        for i in range(args["steps"] + 1):
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(ids, pos, None, labels=labels)  # per-token CE [b, s] (vocab-parallel, TP1)
            l_val = out.float().mean()
            l_val.backward()
            if gpu:
                torch.cuda.synchronize()
            if i > 0:  # the first step warms up allocators / kernels
                times.append(time.perf_counter() - t0)
            loss = float(l_val.detach())
            model.zero_grad(set_to_none=True)
        step_s = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else _rss_mb() - rss0
        rows.append(dict(ep=ep, experts_per_rank=args["experts"] // ep, param_mb=param_mb, step_s=step_s,
                         loss=loss, peak_mb=peak))  # fmt: skip
        del chunks, model
    parallel.destroy()
    return rows


def _make_model(out: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    from opsd_megatron.demo.tiny import QWEN3_30B_A3B_SHAPE, make_tiny_hf_model

    if args.gpu:
        shape = dict(QWEN3_30B_A3B_SHAPE, num_hidden_layers=args.layers, vocab_size=args.vocab or 151936)
    else:
        h = args.hidden
        shape = dict(
            hidden_size=h, intermediate_size=3 * h, moe_intermediate_size=h, num_experts=args.experts,
            num_experts_per_tok=args.topk, num_hidden_layers=args.layers, num_attention_heads=h // 64,
            num_key_value_heads=max(1, h // 128), head_dim=64, mlp_only_layers=[],
        )  # fmt: skip
        if args.vocab:
            shape["vocab_size"] = args.vocab
    # GPU shape: config only (build_model initialises random weights; no 60 GB safetensors write).
    if args.gpu:
        d = _config_only(out, shape)
    else:
        d = make_tiny_hf_model(out, "qwen3_moe", init_std=0.5, **shape)
    cfg = json.loads((d / "config.json").read_text())
    return d, cfg


def _config_only(out: Path, shape: dict) -> Path:
    from opsd_megatron.demo.tiny import tiny_hf_config

    out.mkdir(parents=True, exist_ok=True)
    tiny_hf_config("qwen3_moe", **shape).save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--ep", default=None, help="comma-separated EP sizes (default 1,2,...,world)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--min-ratio", type=float, default=None)
    ap.add_argument("--gpu", action="store_true", help="Qwen3-30B-A3B layer shape, bf16, one GPU per rank")
    ap.add_argument("--smoke", action="store_true", help="world 1, EP 1, a 1-layer 4-expert model (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.world, args.ep, args.hidden, args.experts, args.layers = 1, "1", 64, 4, 1
        args.seq, args.batch, args.steps = 16, 1, 1
    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs CUDA; none here (the shape is prepared for a lent GPU node).")
        return 1
    if args.gpu:
        args.experts, args.topk, args.seq = 128, 8, max(args.seq, 4096)
    eps = [int(e) for e in args.ep.split(",")] if args.ep else [e for e in (1, 2, 4, 8) if e <= args.world]
    min_ratio = args.min_ratio if args.min_ratio is not None else (0.5 if args.gpu else 0.25)
    import torch.multiprocessing as mp

    from opsd_megatron.mcore.parallel import _free_port

    with tempfile.TemporaryDirectory(prefix="bench_moe_") as tmp:
        model_dir, cfg = _make_model(Path(tmp) / "model", args)
        run = dict(model_dir=str(model_dir), eps=eps, gpu=args.gpu, batch=args.batch, seq=args.seq,
                   steps=args.steps, experts=args.experts, vocab=cfg["vocab_size"])  # fmt: skip
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        t0 = time.perf_counter()
        try:
            if args.world == 1:  # one rank: in this process (no spawn)
                _one_rank(_free_port(), run, tmp)
            else:
                mp.spawn(_rank_main, args=(args.world, _free_port(), run, tmp), nprocs=args.world, join=True)
        except Exception as e:  # the per-rank traceback is in rank*.err
            errs = sorted(Path(tmp).glob("rank*.err"))
            print(f"FAILED: {e}\n" + (errs[0].read_text() if errs else ""))
            return 1
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
    wall = time.perf_counter() - t0
    tokens = args.world * args.batch * args.seq
    print(f"MoE step (fwd+bwd), {'GPU bf16' if args.gpu else 'CPU fp32'}: world {args.world}, "
          f"{args.layers} layers, hidden {cfg['hidden_size']}, {args.experts} experts top-{args.topk}, "
          f"{tokens} tokens/step (batch {args.batch} x seq {args.seq} per rank); "
          f"total {wall:.0f}s")  # fmt: skip
    print(f"{'EP':>3} {'experts/rank':>12} {'params MB/rank':>14} {'peak MB/rank':>12} {'step s':>8} "
          f"{'tokens/s':>9} {'vs EP1':>7}")  # fmt: skip
    ok = True
    base = None
    prev_mb = None
    for i, ep in enumerate(eps):
        rows = [pr[i] for pr in per_rank]
        step_s = max(r["step_s"] for r in rows)  # the slowest rank sets the pace
        tps = tokens / step_s
        base = tps if base is None else base
        mb = max(r["param_mb"] for r in rows)
        peak = max(r["peak_mb"] for r in rows)
        ratio = tps / base
        print(f"{ep:>3} {rows[0]['experts_per_rank']:>12} {mb:>14.1f} {peak:>12.1f} {step_s:>8.3f} "
              f"{tps:>9.0f} {ratio:>7.2f}")  # fmt: skip
        if not all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e6 for r in rows):
            print(f"FAIL: EP{ep}: non-finite loss {[r['loss'] for r in rows]}")
            ok = False
        if prev_mb is not None and not mb < prev_mb:
            print(f"FAIL: EP{ep}: parameter memory per rank {mb:.1f} MB does not shrink (was {prev_mb:.1f})")
            ok = False
        if ratio < min_ratio:
            print(f"FAIL: EP{ep}: tokens/s ratio {ratio:.2f} < {min_ratio} x EP1")
            ok = False
        prev_mb = mb
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
