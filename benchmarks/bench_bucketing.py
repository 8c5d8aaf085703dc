"""Length-grouped micro-batches (`train.group_by_length`): padding fraction and OPSD step time on a
long-tailed length mix, one length per step (today's packing) vs one length per micro-batch.

    .venv/bin/python benchmarks/bench_bucketing.py            # 32 samples, micro-batch 2, hidden 256
    .venv/bin/python benchmarks/bench_bucketing.py --smoke    # tiny shapes, seconds

The mix: response lengths log-normal (median ~150 tokens, seeded, capped at 2,048), student prompts 40-120
tokens, teacher prompts 100-600 tokens longer (problem + reference solution). One process (world 1, gloo),
a tiny random Qwen3-architecture model in fp32 on CPU (the teacher: a perturbed copy); the step is the OPSD
teacher pass + student forward/backward of `opsd_megatron.step.opsd` (`teacher_hidden`, `student_step`; the
optimizer update is the same in both and left out), best of --repeats. Prints padding fraction (padded
share of the packed student + teacher positions, `batch/padding_fraction`), step time, their ratios to the
ungrouped packing, and the loss; exits 1 when the grouped padding fraction exceeds --goal (default 0.15),
when the loss or a gradient differs from the ungrouped packing's by more than 1e-6 relative (fp32), or on
error. `--smoke`: no padding goal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def long_tailed_mix(n: int, vocab: int, *, seed: int = 0, median: float = 150.0, cap: int = 2048,
                    prompt=(40, 120), extra=(100, 600)) -> list:  # fmt: skip
    """`n` rollouts with log-normal response lengths (sigma 0.8), student prompts of `prompt` tokens and
    teacher prompts `extra` tokens longer."""
    from opsd_megatron.rollout.base import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        r = int(min(cap, max(2, torch.empty(1).log_normal_(0.0, 0.8, generator=g).item() * median)))
        sp = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        tp = sp + int(torch.randint(extra[0], extra[1] + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (sp + tp + r,), generator=g).tolist()
        lps = (-torch.rand(r, generator=g) * 3).tolist()
        out.append(Sample(ids[:sp], ids[sp : sp + tp], ids[sp + tp :], lps))
    return out


def run(args) -> dict:
    """{grouped: (padding fraction, best step seconds, loss, grads, micro-batch lengths)}; world 1."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # fmt: skip
    from opsd_megatron.demo.tiny import tiny_hf_config
    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.models import build_model
    from opsd_megatron.step.batch import pack_step, padding_fraction
    from opsd_megatron.step.opsd import LossSpec, student_step, teacher_hidden
    from opsd_megatron.step.teacher import make_teacher

    ps = parallel.initialize(1, 1, seed=0)
    hf = tiny_hf_config(
        "qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=args.hidden // 4, max_position_embeddings=4096,
    ).to_dict()  # fmt: skip
    chunks = build_model(hf, torch.float32)
    t_chunks = build_model(hf, torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a teacher that differs from the student: a divergence well above rounding
        for (_, p), (_, q) in zip(chunks[0].named_parameters(), t_chunks[0].named_parameters()):
            q.copy_(p + 0.5 * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=g))
    teacher = make_teacher("current", t_chunks)
    spec = LossSpec(kind="forward_kl", beta=0.0, temperature=1.0, clip=None, top_k=None,
                    vocab_size=args.vocab, tp_group=ps.tp_group)  # fmt: skip
    samples = long_tailed_mix(args.samples, args.vocab, median=args.median, prompt=args.prompt,
                              extra=args.extra)  # fmt: skip
    out = {}
    for grouped in (False, True):
        mbs = pack_step(samples, micro_batch_size=args.micro_batch, pad_id=0, group_by_length=grouped)
        pad, total = padding_fraction(mbs)
        scale = len(mbs) / sum(m.num_tokens for m in mbs)
        best, sums = float("inf"), None
        for _ in range(args.repeats):
            for p in chunks[0].parameters():
                p.grad = None
            t0 = time.perf_counter()
            with teacher.forward_context() as tc:
                th, tw = teacher_hidden(tc, mbs, micro_batch_size=args.micro_batch)
            sums = student_step(chunks, mbs, th, tw, spec, scale=scale, micro_batch_size=args.micro_batch)
            best = min(best, time.perf_counter() - t0)
        grads = {n: p.grad.clone() for n, p in chunks[0].named_parameters() if p.grad is not None}
        lengths = [(m.student_tokens.shape[1], m.teacher_tokens.shape[1]) for m in mbs]
        out[grouped] = (pad / total, best, sums["loss_sum"] / sums["tokens"], grads, lengths)
    parallel.destroy()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, no padding goal")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--median", type=float, default=150.0, help="median response length (tokens)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--goal", type=float, default=0.15)
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args(argv)
    args.prompt, args.extra = (40, 120), (100, 600)
    if args.smoke:
        args.samples, args.median, args.hidden, args.vocab, args.repeats = 8, 12.0, 64, 512, 1
        args.prompt, args.extra = (4, 12), (8, 40)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    res = run(args)
    base = res[False]
    print(
        f"OPSD step on a long-tailed length mix: {args.samples} samples (median response {args.median:.0f} "
        f"tokens), micro-batch {args.micro_batch}, hidden {args.hidden}, {args.layers} layers, vocab "
        f"{args.vocab}, world 1, fp32 CPU, best of {args.repeats}"
    )
    head = f"{'packing':<22}{'padding':>9}{'ratio':>8}{'step s':>9}{'ratio':>8}{'loss':>14}"
    print(head + f"{'lengths S/T':>24}")
    for grouped, (pad, sec, loss, _, lengths) in res.items():
        name = "group_by_length" if grouped else "one length per step"
        span = f"{min(s for s, _ in lengths)}-{max(s for s, _ in lengths)}/" + (
            f"{min(t for _, t in lengths)}-{max(t for _, t in lengths)}"
        )
        print(f"{name:<22}{pad:>9.3f}{pad / max(base[0], 1e-12):>8.3f}{sec:>9.3f}{sec / base[1]:>8.3f}"
              f"{loss:>14.8f}{span:>24}")  # fmt: skip
    rc = 0
    new = res[True]
    if abs(new[2] - base[2]) > 1e-6 * abs(base[2]) + 1e-9:
        print(f"FAIL: grouped loss {new[2]} differs from {base[2]}")
        rc = 1
    worst = max(((new[3][k] - g).norm() / g.norm().clamp_min(1e-30)).item() for k, g in base[3].items())
    print(f"largest relative gradient difference {worst:.2e} (goal <= 1e-6)")
    if worst > 1e-6:
        rc = 1
    if not args.smoke:
        ok = new[0] <= args.goal
        print(f"grouped padding fraction {new[0]:.3f}: {'OK' if ok else 'MISSED'} (goal <= {args.goal})")
        rc = rc or (0 if ok else 1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
