"""Peak memory of one OPSD step (teacher forward + student forward/backward), fused vs materialising path.

    .venv/bin/python benchmarks/bench_step_memory.py      # hidden 256, vocab 65,536, 4 x 512 tokens, TP2
    .venv/bin/python benchmarks/bench_step_memory.py --vocab 151936 --goal 0.25

A tiny Qwen3-architecture model (2 layers, random weights, fp32, tied embeddings) with a LARGE vocabulary, on
CPU with TP2 (two gloo processes): 4 prompts (64-token student, 192-token teacher prompts) x 512 response
tokens, micro-batch 2. Each path runs in fresh processes: one warm-up step, then the measured step; the
peak is the per-rank peak RSS during the measured step above the RSS just before it (VmHWM reset through
/proc/self/clear_refs; glibc's mmap threshold pinned so freed tensors leave RSS at once).

Paths: `old` = the materialising step the trainer ran before (Megatron's output layer gives [b, T, v/tp]
logits at every position, the teacher's [b, R, v/tp] are kept for every micro-batch, three passes for loss,
metrics and drift logprobs; `tests/step_reference.py`); `new` = `opsd_megatron.step.opsd` (hidden states,
fused LM-head loss, one pass), with the default chunk and with `loss.chunk_tokens`. Prints a table with
the ratio new / old per rank; exits 1 when a `new` row's ratio exceeds --goal (default 0.25), or on error.
The optimizer step is left out (the same in both paths).

    .venv/bin/python benchmarks/bench_step_memory.py --compare recompute   # none / selective / full
    .venv/bin/python benchmarks/bench_step_memory.py --smoke               # both tables at tiny shapes

`--compare recompute`: the fused step (`new`) on a long-sequence shape (4 layers, hidden 256, 8 heads, vocab
8,192, 4 prompts: 256-token student, 512-token teacher prompts, 1,536 response tokens; student sequences
1,792 tokens) built with `model.recompute` none, selective and full (uniform, 1 layer per unit); the step's
peak is the activation part (weights, gradient buffers and the optimizer exist before it). Prints the
ratio to `none` per rank; exits 1 when full / none exceeds --recompute-goal (default 0.5), when a loss
differs from `none`'s (fp32: 1e-6 relative), or on error. `--smoke`: tiny shapes, no memory goal (the loss
checks stay).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_row(args, ps, path: str, chunk) -> dict:
    """One row in this (spawned) rank: build, warm-up step, measured step; its peak RSS above the pre-step
    RSS (MiB) and its loss."""
    import gc

    from step_reference import fixed_samples, old_student_step, old_teacher_logits

    from opsd_megatron.demo.tiny import tiny_hf_config
    from opsd_megatron.mcore.models import build_model
    from opsd_megatron.rollout.base import SamplingConfig
    from opsd_megatron.step.batch import pack_step
    from opsd_megatron.step.opsd import LossSpec, student_step, teacher_hidden
    from opsd_megatron.step.optim import install_schedule_hooks, wrap_ddp
    from opsd_megatron.step.teacher import make_teacher

    hf = tiny_hf_config(
        "qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=2,
        head_dim=args.hidden // args.heads, max_position_embeddings=8192,
    ).to_dict()  # fmt: skip
    recompute = path.split(":")[1] if path.startswith("recompute:") else "none"
    torch.manual_seed(0)
    chunks = build_model(hf, torch.float32, recompute=recompute)
    teacher = make_teacher("frozen", chunks, lambda: build_model(hf, torch.float32))
    chunks = wrap_ddp(chunks)
    install_schedule_hooks(chunks)
    samples = fixed_samples(
        args.vocab,
        n=args.prompts,
        resp=(args.response, args.response),
        s_prompt=(args.student_prompt, args.student_prompt),
        t_prompt=(args.teacher_prompt, args.teacher_prompt),
    )
    mbs = pack_step(samples, micro_batch_size=args.micro_batch, pad_id=0)
    scale = len(mbs) / sum(m.num_tokens for m in mbs)
    spec = LossSpec(
        kind="forward_kl", beta=0.0, temperature=1.1, clip=0.05, top_k=None, vocab_size=args.vocab,
        tp_group=ps.tp_group, sampling=SamplingConfig(temperature=1.1, top_p=0.95, top_k=20),
        chunk_tokens=chunk,
    )  # fmt: skip

    def step():
        for c in chunks:
            c.zero_grad_buffer()
        with teacher.forward_context() as tc:
            if path == "old":
                t = old_teacher_logits(tc, mbs, args.micro_batch)
            else:
                t, tw = teacher_hidden(tc, mbs, micro_batch_size=args.micro_batch)
        if path == "old":
            return old_student_step(chunks, mbs, t, spec, scale=scale, micro_batch_size=args.micro_batch)
        return student_step(chunks, mbs, t, tw, spec, scale=scale, micro_batch_size=args.micro_batch)

    step()  # warm-up: one-time allocations (autograd, gloo buffers) are not the step's
    gc.collect()
    torch.distributed.barrier()
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    sums = step()
    peak = _rss_kib("VmHWM") - base
    torch.distributed.barrier()
    return {"peak_mib": peak / 1024, "loss": sums["loss_sum"] / max(sums["tokens"], 1)}


def _worker(rank: int, world: int, port: int, args, rows: list, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    from opsd_megatron.mcore import parallel

    ps = parallel.initialize(args.tp, 1, seed=0)
    for i, (path, chunk) in enumerate(rows):
        torch.save(_measure_row(args, ps, path, chunk), Path(out_dir) / f"{i}_{rank}.pt")
    parallel.destroy()


def run_rows(args, rows: list, *, fresh: bool = True) -> dict:
    """{row: per-rank results}; `fresh`: each row in new processes (a clean peak), else all rows in one
    spawn (smoke: seconds, not minutes)."""
    import socket

    import torch.multiprocessing as mp

    groups = [[r] for r in rows] if fresh else [list(rows)]
    out: dict = {}
    for group in groups:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory(prefix="opsd_stepmem_") as d:
            os.environ.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
            mp.start_processes(_worker, args=(args.tp, port, args, group, d), nprocs=args.tp,
                               start_method="spawn", join=True)  # fmt: skip
            for i, row in enumerate(group):
                out[row] = [torch.load(Path(d) / f"{i}_{r}.pt") for r in range(args.tp)]
    return out


def _same_loss(a: float, b: float, rel: float) -> bool:
    """fp32 losses of the same step: equal to `rel` relative (plus 1e-7 absolute: tiny smoke losses)."""
    return abs(a - b) <= rel * abs(b) + 1e-7


SHAPES = {  # --compare -> defaults of the shape flags; --smoke: tiny shapes of either
    "loss": dict(
        hidden=256,
        vocab=65536,
        layers=2,
        heads=4,
        prompts=4,
        response=512,
        student_prompt=64,
        teacher_prompt=192,
    ),
    "recompute": dict(
        hidden=256,
        vocab=8192,
        layers=4,
        heads=8,
        prompts=4,
        response=1536,
        student_prompt=256,
        teacher_prompt=512,
    ),
    "smoke": dict(
        hidden=64, vocab=1024, layers=2, heads=4, prompts=4, response=32, student_prompt=8, teacher_prompt=12
    ),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--compare",
        choices=("loss", "recompute"),
        default="loss",
        help="loss: old materialising vs fused step; recompute: model.recompute modes",
    )
    ap.add_argument("--smoke", action="store_true", help="both comparisons at tiny shapes, no memory goal")
    for name in SHAPES["loss"]:
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--chunk-tokens", type=int, default=128, help="loss.chunk_tokens of the second new row")
    ap.add_argument("--goal", type=float, default=0.25)
    ap.add_argument("--recompute-goal", type=float, default=0.5)
    return ap.parse_args(argv)


def with_shape(args, shape: str):
    """A copy of `args` with the unset shape flags taken from `SHAPES[shape]`."""
    out = argparse.Namespace(**vars(args))
    for k, v in SHAPES[shape].items():
        if getattr(out, k) is None:
            setattr(out, k, v)
    return out


def compare_loss_paths(args, *, goal: float | None, res: dict | None = None) -> int:
    """old vs new (fused) step; 1 when a new row's ratio exceeds `goal` (None: no goal) or a loss differs."""
    rows = [("old", None), ("new", None), ("new", args.chunk_tokens)]
    res = res or run_rows(args, rows, fresh=goal is not None)
    old = res[("old", None)]
    print(
        f"OPSD step peak memory per rank (RSS above the pre-step RSS), hidden {args.hidden}, vocab "
        f"{args.vocab}, {args.prompts} x {args.response} response tokens, micro-batch {args.micro_batch}, "
        f"TP{args.tp}, fp32 CPU"
    )
    print(f"{'path':<8}{'loss.chunk_tokens':>18}{'rank':>6}{'peak MiB':>11}{'ratio':>8}{'loss':>12}")
    worst = 0.0
    for (path, chunk), per_rank in ((row, res[row]) for row in rows):
        for r, x in enumerate(per_rank):
            ratio = x["peak_mib"] / max(old[r]["peak_mib"], 1e-9)
            if path == "new":
                worst = max(worst, ratio)
            c = str(chunk or "default")
            print(f"{path:<8}{c:>18}{r:>6}{x['peak_mib']:>11.1f}{ratio:>8.3f}{x['loss']:>12.6f}")
    for r in range(args.tp):  # same step, same loss (fp32)
        for row in rows[1:]:
            a, b = res[row][r]["loss"], old[r]["loss"]
            if not _same_loss(a, b, 1e-5):
                print(f"FAIL: {row} loss {a} differs from the old path's {b}")
                return 1
    if goal is None:
        print(f"worst new/old ratio {worst:.3f} (smoke: no goal)")
        return 0
    ok = worst <= goal
    print(f"worst new/old ratio {worst:.3f}: {'OK' if ok else 'MISSED'} (goal <= {goal})")
    return 0 if ok else 1


def compare_recompute(args, *, goal: float | None, res: dict | None = None) -> int:
    """model.recompute none / selective / full on the fused step; 1 when full / none exceeds `goal` (None:
    no goal) or a loss differs from none's by more than 1e-6 relative."""
    modes = ("none", "selective", "full")
    rows = res or run_rows(args, [(f"recompute:{m}", None) for m in modes], fresh=goal is not None)
    res = {m: rows[(f"recompute:{m}", None)] for m in modes}
    s_len = args.student_prompt + args.response
    print(
        f"OPSD step peak memory per rank by model.recompute (RSS above the pre-step RSS: activations), "
        f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, {args.prompts} "
        f"prompts x {s_len}-token student sequences, micro-batch {args.micro_batch}, TP{args.tp}, fp32 CPU"
    )
    print(f"{'recompute':<11}{'rank':>6}{'peak MiB':>11}{'vs none':>9}{'loss':>14}")
    worst, rc = 0.0, 0
    for m in modes:
        for r, x in enumerate(res[m]):
            base = res["none"][r]
            ratio = x["peak_mib"] / max(base["peak_mib"], 1e-9)
            if m == "full":
                worst = max(worst, ratio)
            print(f"{m:<11}{r:>6}{x['peak_mib']:>11.1f}{ratio:>9.3f}{x['loss']:>14.8f}")
            if not _same_loss(x["loss"], base["loss"], 1e-6):
                print(f"FAIL: recompute={m} loss {x['loss']} differs from none's {base['loss']} (rank {r})")
                rc = 1
    if goal is None:
        print(f"worst full/none ratio {worst:.3f} (smoke: no goal)")
        return rc
    ok = worst <= goal
    print(f"worst full/none ratio {worst:.3f}: {'OK' if ok else 'MISSED'} (goal <= {goal})")
    return rc or (0 if ok else 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.smoke:
        tiny = with_shape(args, "smoke")  # every row in one spawn
        loss_rows = [("old", None), ("new", None), ("new", tiny.chunk_tokens)]
        res = run_rows(tiny, loss_rows + [(f"recompute:{m}", None) for m in ("none", "selective", "full")],
                       fresh=False)  # fmt: skip
        return compare_loss_paths(tiny, goal=None, res=res) or compare_recompute(tiny, goal=None, res=res)
    if args.compare == "recompute":
        return compare_recompute(with_shape(args, "recompute"), goal=args.recompute_goal)
    return compare_loss_paths(with_shape(args, "loss"), goal=args.goal)


if __name__ == "__main__":
    sys.exit(main())
