"""One OPSD step of a Qwen3-1.7B-shaped random model on one GPU, timed by phase, vs plain Megatron passes;
exits 1 above the 1.10x goal (benchmarks/thresholds.py, docs/performance.md) or on any exception.

    python benchmarks/gpu_step_check.py [--prompts 8] [--micro 2] [--seq 4096] [--reps 3]
    python benchmarks/gpu_step_check.py --seq 0 --new-tokens 512   # responses sampled by HF generate instead
    python benchmarks/gpu_step_check.py --tiny        # CPU smoke test of this script (tiny model)

Builds a random Qwen3-1.7B-shaped HF checkpoint (28 layers, hidden 2048, GQA 16/8, head_dim 128, vocab
151,936, tied embeddings; bf16) in a temp dir, starts the real `Trainer` on it (TP=PP=1, bf16, frozen
teacher copy, forward KL with clip 0.05, temperature 1.1; rollout engine "hf" since vLLM is absent on the
check machine) and times, with CUDA synchronisation, one step by phase: rollout / teacher forward / student
forward+backward+loss / loss alone / optimizer / weight refresh. With `--seq N` (default 4096) the
responses are random token ids filling each student sequence to N tokens (random weights generate nothing
meaningful, and a 4096-token HF rollout alone would take minutes); the rollout row then times a short
generation. Then, on the SAME packed sequences, it
times a plain Megatron student forward+backward (vocab-parallel cross-entropy on the response tokens) and a
plain teacher forward (forward-only schedule, no loss), each alone, and prints

    ratio = (teacher fwd + student fwd/bwd with the OPSD loss) / (plain student fwd/bwd + plain teacher fwd)

against the target <= 1.10 (docs/performance.md), and a CUDA profile of one OPSD step (top kernels by CUDA
time) that shows where the time above the plain passes goes. Medians over `--reps` after one warm-up.
< 4 minutes on an H200.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from thresholds import check  # noqa: E402

from opsd_megatron.demo.tiny import QWEN3_1_7B_SHAPE  # noqa: E402

QWEN3_1_7B = QWEN3_1_7B_SHAPE


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> tuple[float, object]:
    """Median seconds of `fn()` over `reps` runs after one warm-up (CUDA-synchronised); last result."""
    out = fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (= global batch)")
    ap.add_argument("--micro", type=int, default=2, help="micro-batch size")
    ap.add_argument("--seq", type=int, default=4096, help="student sequence length (0: sampled responses)")
    ap.add_argument(
        "--new-tokens", type=int, default=512, help="rollout length (random weights: always reached)"
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=QWEN3_1_7B["num_hidden_layers"])
    ap.add_argument(
        "--tiny", action="store_true", help="smoke test of this script with the tiny model (CPU ok)"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("FAIL: no CUDA device; this check needs one GPU (or --tiny for a CPU smoke test).")
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.demo.tiny import make_tiny_hf_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    tmp = Path(tempfile.mkdtemp(prefix="opsd_gpu_step_"))
    t0 = time.perf_counter()
    shape = dict(QWEN3_1_7B, num_hidden_layers=args.layers)
    vocab = shape.pop("vocab_size")
    if args.tiny:
        shape, vocab = {}, 731
    model_dir = make_tiny_hf_model(
        tmp / "qwen3-1.7b-random", "qwen3", dtype="bfloat16", vocab_size=vocab, **shape
    )
    print(f"[setup] random Qwen3-1.7B-shaped checkpoint written in {time.perf_counter() - t0:.1f} s")

    cfg = config_from_dict(
        {
            "output_dir": str(tmp / "run"),
            "model": {"path": str(model_dir), "dtype": "float32" if args.tiny else "bfloat16"},
            "data": {"path": "builtin:tiny_math", "answer_field": None},  # random ids: nothing to grade
            "rollout": {"engine": "hf", "max_new_tokens": args.new_tokens if not args.seq else 16},
            "loss": {"kind": "forward_kl", "clip": 0.05},
            "train": {"steps": 1, "global_batch_size": args.prompts, "micro_batch_size": args.micro},
            "checkpoint": {"save_interval": 0, "export_hf": False, "resume": False},
            "logging": {"progress_bar": False},
        }
    )
    from opsd_megatron.run.trainer import Trainer

    t0 = time.perf_counter()
    tr = Trainer(cfg)
    print(f"[setup] trainer (model, teacher copy, optimizer, HF engine) in {time.perf_counter() - t0:.1f} s")
    try:
        return run_checks(tr, args, gpu)
    finally:
        tr.close()


def synthetic_samples(tr, samples, seq: int) -> list:
    """The sampled prompts with random responses filling each student sequence to `seq` tokens."""
    from opsd_megatron.step.batch import Sample

    g = torch.Generator().manual_seed(0)
    out = []
    for s in samples:
        n = max(1, seq - len(s.student_prompt))
        ids = torch.randint(0, tr.state.info.vocab_size, (n,), generator=g).tolist()
        out.append(Sample(s.student_prompt, s.teacher_prompt, ids, [0.0] * n, truncated=True))
    return out


def profile_step(tr, mbs, G, rows: int = 25) -> None:
    """CUDA time per kernel over one OPSD step (teacher forward + student forward/backward with the loss)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        tl = tr.strategy.teacher_forward(mbs)
        for c in tr.state.chunks:
            c.zero_grad_buffer()
        tr.strategy.forward_backward_step(mbs, tl, G)
        sync()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"\nProfile of one OPSD step (teacher fwd + student fwd/bwd + loss), top {rows} by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def run_checks(tr, args, gpu: str) -> int:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from opsd_megatron.losses import vocab_parallel_divergence
    from opsd_megatron.step.batch import gather_positions, pack_step
    from opsd_megatron.step.opsd import run_schedule

    dev = tr.state.ps.device
    sync()
    t0 = time.perf_counter()
    samples, rstats = tr.strategy.rollout(0)
    sync()
    t_rollout = time.perf_counter() - t0
    if args.seq:
        samples = synthetic_samples(tr, samples, args.seq)
    mbs = pack_step(samples, micro_batch_size=args.micro, pad_id=tr.state.pad_id, pad_to_multiple=64)
    G = sum(m.num_tokens for m in mbs)
    S, T = mbs[0].student_tokens.shape[1], mbs[0].teacher_tokens.shape[1]
    print(f"[data] {len(samples)} samples, {len(mbs)} micro-batches of {args.micro}; student len {S}, "
          f"teacher len {T}, response tokens {G} (mean {rstats['rollout/response_length']:.0f})")  # fmt: skip

    def opsd_teacher():
        return tr.strategy.teacher_forward(mbs)

    t_teacher, tlogits = timed(opsd_teacher, args.reps)

    def opsd_student():
        for c in tr.state.chunks:
            c.zero_grad_buffer()
        return tr.strategy.forward_backward_step(mbs, tlogits, G)

    t_student, _ = timed(opsd_student, args.reps)

    # The loss alone, on the gathered logits of one micro-batch (x number of micro-batches).
    lc = tr.cfg.loss
    with torch.no_grad():
        out0 = tr.state.chunks[0](
            *(t.to(dev) for t in (mbs[0].student_tokens, mbs[0].student_position_ids)), None
        )
    s_sel = gather_positions(out0, mbs[0].student_index.to(dev)).detach().requires_grad_(True)

    def loss_only():
        per = vocab_parallel_divergence(
            s_sel, tlogits.hidden[0], kind=lc.kind, temperature=tr.cfg.rollout.temperature, clip=lc.clip,
            loss_mask=mbs[0].loss_mask.to(dev), vocab_size=tr.state.info.vocab_size,
            tp_group=tr.state.ps.tp_group,
        )  # fmt: skip
        per.sum().backward()

    t_loss = timed(loss_only, args.reps)[0] * len(mbs)

    def optimizer_step():
        tr.state.optimizer.step()

    t_opt, _ = timed(optimizer_step, 1)
    t_refresh, _ = timed(tr.refresh, 1)

    # Plain Megatron passes on the same sequences.
    def plain_student():
        for c in tr.state.chunks:
            c.zero_grad_buffer()

        def step_fn(it, model):
            mb = next(it)
            out = model(mb.student_tokens, mb.student_position_ids, None)  # [b, S, v]

            def ce(output):
                sel = gather_positions(output, mb.student_index)  # [b, R, v]
                per = vocab_parallel_cross_entropy(sel.float().transpose(0, 1).contiguous(),
                                                   mb.response_ids.t().contiguous())  # fmt: skip
                return (per.t() * mb.loss_mask).sum() / G, {}

            return out, ce

        return run_schedule(
            step_fn, [m.to(dev) for m in mbs], tr.state.chunks, S, tr.cfg.train.micro_batch_size, False
        )

    t_plain_s, _ = timed(plain_student, args.reps)

    def plain_teacher():
        def step_fn(it, model):
            mb = next(it)
            out = model(mb.teacher_tokens, mb.teacher_position_ids, None)
            return out, lambda output: (output.new_zeros(()), {})

        with tr.state.teacher.forward_context() as chunks:
            return run_schedule(
                step_fn, [m.to(dev) for m in mbs], chunks, T, tr.cfg.train.micro_batch_size, True
            )

    t_plain_t, _ = timed(plain_teacher, args.reps)
    opsd = t_teacher + t_student
    plain = t_plain_s + t_plain_t
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"\nOPSD step on {gpu} (Qwen3-1.7B shape, bf16, TP=PP=1, median of {args.reps})")
    print(f"{'phase':<44}{'seconds':>10}")
    for name, v in [
        ("rollout (HF generate)", t_rollout),
        ("teacher forward (forward-only schedule)", t_teacher),
        ("student fwd+bwd incl. loss", t_student),
        ("  of which loss fwd+bwd (isolated)", t_loss),
        ("optimizer step", t_opt),
        ("weight refresh (export + engine load)", t_refresh),
        ("plain Megatron student fwd+bwd (CE)", t_plain_s),
        ("plain Megatron teacher forward", t_plain_t),
    ]:
        print(f"{name:<44}{v:>10.3f}")
    rest = opsd - plain
    print(f"{'OPSD - plain (what the loss and bookkeeping add)':<44}{rest:>10.3f}")
    print(f"{'  of which loss fwd+bwd (isolated)':<44}{t_loss:>10.3f}")
    print(f"{'  rest (schedule, gathers, metrics, copies)':<44}{rest - t_loss:>10.3f}")
    failures: list[str] = []
    verdict = check("gpu_step_x_plain", opsd / plain, failures)
    print(f"\ntrain step (teacher + student + loss) / (plain student + plain teacher) = "
          f"{opsd:.3f} / {plain:.3f} = {opsd / plain:.3f}x   {verdict}")  # fmt: skip
    print(f"peak GPU memory allocated: {peak:.1f} GiB; tokens/s (response) {G / opsd:.0f}")
    profile_step(tr, mbs, G)
    print("FAIL: " + "; ".join(failures) if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
