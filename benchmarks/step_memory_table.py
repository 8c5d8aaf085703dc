"""Per-rank GPU memory of one OPSD step for Qwen3-1.7B / 8B / 32B, old (materialising) vs new (fused) step.

    python3 benchmarks/step_memory_table.py            # markdown table (docs/memory.md holds its output)
    python3 benchmarks/step_memory_table.py --gpu-gib 141 --micro-batch 2
    python3 benchmarks/step_memory_table.py --smoke    # the same table (arithmetic only: already seconds)

Computed from the model shapes, not measured. Assumptions (the paper's batch, this package's defaults):
32 prompts per step, 1,024 response tokens, 256-token student prompt, 1,280-token teacher prompt (problem +
reference solution), micro-batch 4, bf16 weights, Megatron DDP fp32 gradient buffer, distributed AdamW
(fp32 master + 2 moments, sharded over DP), full fine-tuning with a frozen teacher copy (LoRA: the copy and
most grads/optimizer vanish), flash attention, no activation recomputation, sequence parallel off. The worst
rank is counted: the first pipeline stage's activations (1F1B keeps PP micro-batches in flight) and the last
stage's LM head, logits and teacher storage.

Rows: weights; grads (fp32 buffer); optimizer; teacher (frozen copy); activations (student, Korthikanti et
al.: s·b·h·(10 + 24/TP) bytes per layer, L layers in flight); teacher storage (old: [B, R, v/tp] bf16 logits
for the replica's B prompts; new: [B, R, h] bf16 hidden states); loss (old: the student's [b, S, v/tp] bf16
logits and their gradient, the gathered [b, R, v/tp] copy and its saved gradient, and the fp32 [b·R, v/tp]
temporaries of the metrics and drift passes; new: one chunk of ~1 GB of bf16 student + teacher logits, its
fp32 drift temporaries, the LM-head weight gradient accumulator); rollout engine (vLLM's share of the GPU,
`rollout.gpu_memory_utilization` 0.3, the same in both).
"""

from __future__ import annotations

import argparse

GIB = 2**30
MODELS = {  # name: (hidden, layers, heads, kv heads, head_dim, ffn, vocab, tied, (tp, pp, gpus))
    "Qwen3-1.7B": (2048, 28, 16, 8, 128, 6144, 151_936, True, (1, 1, 8)),
    "Qwen3-8B": (4096, 36, 32, 8, 128, 12_288, 151_936, False, (2, 1, 8)),
    "Qwen3-32B": (5120, 64, 64, 8, 128, 25_600, 151_936, False, (8, 2, 16)),
}


def params(h, layers, heads, kv, hd, ffn, vocab, tied) -> int:
    attn = h * (heads + 2 * kv) * hd + heads * hd * h + 2 * hd  # qkv, o, q/k norms
    mlp = 3 * h * ffn
    return layers * (attn + mlp + 2 * h) + vocab * h * (1 if tied else 2) + h


def rows(name: str, a) -> dict[str, tuple[float, float]]:
    h, layers, heads, kv, hd, ffn, vocab, tied, (tp, pp, gpus) = MODELS[name]
    dp = gpus // (tp * pp)
    n = params(h, layers, heads, kv, hd, ffn, vocab, tied) / (tp * pp)  # parameters per rank (even split)
    B = a.prompts // dp  # prompts per replica
    b, R = a.micro_batch, a.response
    S = a.student_prompt + R
    v = vocab / tp
    weights = 2 * n
    grads = 4 * n
    optim = 12 * n / dp
    teacher = 2 * n
    act = layers * S * b * h * (10 + 24 / tp)
    store_old, store_new = 2 * B * R * v, 2 * B * R * h
    loss_old = 2 * b * S * v * 2 + 2 * b * R * v * 2 + 4 * b * R * v * 5
    c = min(b * R, int(GIB / (2 * 2 * v)))  # tokens per chunk: ~1 GB of bf16 student + teacher logits
    loss_new = 2 * 2 * c * v + 4 * c * v * 2 + 2 * v * h
    engine = a.engine_share * a.gpu_gib * GIB
    same = {"weights": weights, "grads": grads, "optimizer": optim, "teacher copy": teacher,
            "activations": act, "rollout engine": engine}  # fmt: skip
    out = {k: (x, x) for k, x in same.items()}
    out["teacher storage"] = (store_old, store_new)
    out["loss (logits)"] = (loss_old, loss_new)
    out["total"] = tuple(sum(x[i] for x in out.values()) for i in (0, 1))
    out["_layout"] = f"TP{tp} PP{pp} DP{dp}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--response", type=int, default=1024)
    ap.add_argument("--student-prompt", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--engine-share", type=float, default=0.3)
    ap.add_argument("--smoke", action="store_true", help="accepted for uniformity (the table is arithmetic)")
    a = ap.parse_args()
    table = {m: rows(m, a) for m in MODELS}
    head = "| GiB per rank | " + " | ".join(f"{m} {table[m]['_layout']} old | new" for m in MODELS) + " |"
    print(head)
    print("|---|" + "---:|---:|" * len(MODELS))
    for key in [k for k in table["Qwen3-8B"] if not k.startswith("_")]:
        cells = " | ".join(f"{table[m][key][0] / GIB:.1f} | {table[m][key][1] / GIB:.1f}" for m in MODELS)
        print(f"| {'**total**' if key == 'total' else key} | {cells} |")


if __name__ == "__main__":
    main()
