"""One OPSD step of a Qwen3-1.7B-shaped random model on one GPU, timed by phase, vs plain Megatron passes;
exits 1 above the 1.10x goal (benchmarks/thresholds.py, docs/performance.md) or on any exception.

    python benchmarks/gpu_step_check.py [--prompts 8] [--micro 2] [--seq 4096] [--reps 3]
    python benchmarks/gpu_step_check.py --seq 0 --new-tokens 512   # responses sampled by HF generate instead
    python benchmarks/gpu_step_check.py --tiny        # CPU smoke test of this script (tiny model)
    python benchmarks/gpu_step_check.py --smoke       # --tiny at the smallest shape (make test runs it)

Builds a random Qwen3-1.7B-shaped HF checkpoint (28 layers, hidden 2048, GQA 16/8, head_dim 128, vocab
151,936, tied embeddings; bf16) in a temp dir, starts the real `Trainer` on it (TP=PP=1, bf16, frozen
teacher copy, forward KL with clip 0.05, temperature 1.1; rollout engine "hf" since vLLM is absent on the
check machine) and times, with CUDA synchronisation, one step by phase: rollout / teacher forward / student
forward+backward+loss / loss alone / optimizer / weight refresh. With `--seq N` (default 4096) the
responses are random token ids filling each student sequence to N tokens (random weights generate nothing
meaningful, and a 4096-token HF rollout alone would take minutes); the rollout row then times a short
generation. Then, on the SAME packed sequences, it times the plain Megatron passes, each alone and neither
building full-vocabulary logits (as the OPSD step builds none): a student forward+backward with
vocab-parallel cross-entropy on the response tokens' hidden states, in LM-head chunks recomputed in backward
(`plain_student_fn`), and a teacher forward (forward-only schedule, stopping before the LM head, no loss).
It prints

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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    ap.add_argument("--smoke", action="store_true", help="--tiny at the smallest shape (seconds; make test)")
    args = ap.parse_args()
    if args.smoke:
        args.tiny, args.seq, args.new_tokens, args.prompts, args.micro, args.reps = True, 0, 4, 1, 1, 1
    if not torch.cuda.is_available() and not args.tiny:
        print("FAIL: no CUDA device; this check needs one GPU (or --tiny for a CPU smoke test).")
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
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
        shape, vocab = {"max_position_embeddings": 4096}, 731
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
        teacher = tr.strategy.teacher_forward(mbs)
        for c in tr.state.chunks:
            c.zero_grad_buffer()
        tr.strategy.forward_backward_step(mbs, teacher, G)
        sync()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"\nProfile of one OPSD step (teacher fwd + student fwd/bwd + loss), top {rows} by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def _loss_only(tr, mbs, teacher, reps: int) -> float:
    """Seconds of the OPSD loss alone (`step.opsd.loss_func`: fused LM-head divergence forward + backward)
    on micro-batch 0's student hidden states, times the number of micro-batches."""
    from opsd_megatron.mcore.models.forward import hidden_states_forward, output_weight
    from opsd_megatron.step.opsd import loss_func

    dev, mb = tr.state.ps.device, mbs[0].to(tr.state.ps.device)
    with torch.no_grad():
        hidden = hidden_states_forward(tr.state.chunks[0], mb.student_tokens, mb.student_position_ids, None,
                                       lengths=mb.student_lengths)  # fmt: skip
    hidden = hidden.detach().requires_grad_(True)  # [b, S, h]
    # a leaf of its own (same storage): the weight gradient is computed as in the step, no DDP hooks fire
    weight = output_weight(tr.state.chunks[-1]).detach().requires_grad_(True)  # [v/tp, h]
    assert dev == hidden.device

    def run():
        loss, _ = loss_func(mb, teacher.hidden[0], teacher.weight, tr.strategy.loss_spec, 1.0, weight, None,
                            hidden)  # fmt: skip
        loss.backward()
        hidden.grad = weight.grad = None

    return timed(run, reps)[0] * len(mbs)


def plain_student_fn(tr, mbs, G: int, S: int):
    """A plain Megatron student forward + backward with vocabulary-parallel cross-entropy on the response
    tokens, WITHOUT full-vocabulary logits: the model stops before the LM head (as the OPSD step does), the
    response positions' hidden states `[b·R, h]` go through the LM-head shard in chunks of the OPSD loss's
    chunk size, each chunk's `[c, v/tp]` logits -> `vocab_parallel_cross_entropy`, recomputed in backward
    (activation checkpointing), so at most one chunk of logits is alive. The same GEMM count as the OPSD
    loss minus its teacher GEMM."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from torch.utils.checkpoint import checkpoint

    from opsd_megatron.losses._phases import default_chunk_size
    from opsd_megatron.mcore.models.forward import hidden_states_forward, output_weight
    from opsd_megatron.step.batch import gather_positions
    from opsd_megatron.step.opsd import chunk_tokens, run_schedule

    dev = tr.state.ps.device
    data = [m.to(dev) for m in mbs]
    weight = output_weight(tr.state.chunks[-1])  # [v/tp, h]
    c = chunk_tokens(tr.strategy.loss_spec, weight) or default_chunk_size(weight.shape[0], 1 << 20, True)

    def ce_chunk(x, w, ids):  # [c, h], [v/tp, h], [c] -> [c]
        return vocab_parallel_cross_entropy((x @ w.t()).float(), ids)

    def step_fn(it, model):
        mb = next(it)
        out = hidden_states_forward(model, mb.student_tokens, mb.student_position_ids, None,
                                    lengths=mb.student_lengths)  # fmt: skip

        def ce(output):  # [b, S, h]
            h = output.shape[-1]
            hs = gather_positions(output, mb.student_index).reshape(-1, h).to(weight.dtype)  # [b·R, h]
            ids, mask = mb.response_ids.reshape(-1), mb.loss_mask.reshape(-1)
            total = hs.new_zeros((), dtype=torch.float32)
            for i in range(0, hs.shape[0], c):
                per = checkpoint(ce_chunk, hs[i : i + c], weight, ids[i : i + c], use_reentrant=False)
                total = total + (per * mask[i : i + c]).sum()
            return total / G, {}

        return out, ce

    def run():
        for ch in tr.state.chunks:
            ch.zero_grad_buffer()
        return run_schedule(step_fn, data, tr.state.chunks, S, tr.cfg.train.micro_batch_size, False)

    return run


def plain_teacher_fn(tr, mbs, T: int):
    """A plain Megatron teacher forward (forward-only schedule, no loss), stopping before the LM head as the
    OPSD teacher pass does (its LM-head GEMM is part of the OPSD loss)."""
    from opsd_megatron.mcore.models.forward import hidden_states_forward
    from opsd_megatron.step.opsd import run_schedule

    data = [m.to(tr.state.ps.device) for m in mbs]

    def step_fn(it, model):
        mb = next(it)
        out = hidden_states_forward(model, mb.teacher_tokens, mb.teacher_position_ids, None,
                                    lengths=mb.teacher_lengths)  # fmt: skip
        return out, lambda output: (output.new_zeros(()), {})

    def run():
        with tr.state.teacher.forward_context() as chunks:
            return run_schedule(step_fn, data, chunks, T, tr.cfg.train.micro_batch_size, True)

    return run


def run_checks(tr, args, gpu: str) -> int:
    from opsd_megatron.step.batch import pack_step

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

    t_teacher, teacher = timed(lambda: tr.strategy.teacher_forward(mbs), args.reps)  # a TeacherOutput

    def opsd_student():
        for c in tr.state.chunks:
            c.zero_grad_buffer()
        return tr.strategy.forward_backward_step(mbs, teacher, G)

    t_student, _ = timed(opsd_student, args.reps)
    t_loss = _loss_only(tr, mbs, teacher, args.reps)
    t_opt, _ = timed(tr.state.optimizer.step, 1)
    t_refresh, _ = timed(tr.refresh, 1)
    t_plain_s, _ = timed(plain_student_fn(tr, mbs, G, S), args.reps)
    t_plain_t, _ = timed(plain_teacher_fn(tr, mbs, T), args.reps)
    opsd = t_teacher + t_student
    plain = t_plain_s + t_plain_t
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    shape = "tiny model, fp32" if args.tiny else "Qwen3-1.7B shape, bf16"
    print(f"\nOPSD step on {gpu} ({shape}, TP=PP=1, median of {args.reps})")
    print(f"{'phase':<44}{'seconds':>10}")
    for name, v in [
        ("rollout (HF generate)", t_rollout),
        ("teacher forward (forward-only schedule)", t_teacher),
        ("student fwd+bwd incl. loss", t_student),
        ("  of which loss fwd+bwd (isolated)", t_loss),
        ("optimizer step", t_opt),
        ("weight refresh (export + engine load)", t_refresh),
        ("plain Megatron student fwd+bwd (chunked CE)", t_plain_s),
        ("plain Megatron teacher forward", t_plain_t),
    ]:
        print(f"{name:<44}{v:>10.3f}")
    rest = opsd - plain
    print(f"{'OPSD - plain (what the loss and bookkeeping add)':<44}{rest:>10.3f}")
    print(f"{'  of which loss fwd+bwd (isolated)':<44}{t_loss:>10.3f}")
    print(f"{'  rest (schedule, gathers, metrics, copies)':<44}{rest - t_loss:>10.3f}")
    failures: list[str] = []
    verdict = check("gpu_step_x_plain", opsd / plain, failures)
    if args.tiny:  # a tiny CPU model's ratio says nothing about the GPU goal: reported, not enforced
        verdict, failures = f"not enforced with --tiny ({opsd / plain:.3f})", []
    print(f"\ntrain step (teacher + student + loss) / (plain student + plain teacher) = "
          f"{opsd:.3f} / {plain:.3f} = {opsd / plain:.3f}x   {verdict}")  # fmt: skip
    print(f"peak GPU memory allocated: {peak:.1f} GiB; tokens/s (response) {G / opsd:.0f}")
    profile_step(tr, mbs, G, rows=8 if args.tiny else 25)
    print("FAIL: " + "; ".join(failures) if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
