"""Per-rank memory of the colocated layout: Megatron shard + rollout-engine shard + KV cache + refresh bucket.

    python scripts/rollout_memory.py               # Qwen3-8B / 32B / 72B-class at engine TP 1, 2, 4, 8
    python scripts/rollout_memory.py --seqs 64 --max-len 9216 --gpu-gib 80

Every rank holds (see docs/architecture.md, "Rollout placement"):
* its Megatron shard, P / (TP x PP) parameters: bf16 weights (2 B) + fp32 main gradients (4 B) + Adam state
  with fp32 master weights (12 B, divided over DP by Megatron's distributed optimizer) for full fine-tuning;
  bf16 weights only (adapters are negligible) with LoRA, the shipped recipes' mode (the adapters-off teacher
  needs no second copy; a frozen full fine-tuning teacher adds another 2 B per shard parameter);
* its shard of one vLLM engine of tensor parallelism T: bf16 weights P / T (vocabulary-parallel embedding and
  head, sharded attention and MLP; norms are replicated and ignored here);
* the KV cache of its engine's sequences in flight, `--seqs` x `--max-len` tokens per engine, each token
  2 (K, V) x layers x max(1, kv_heads / T) x head_dim x 2 B on each rank (vLLM replicates KV heads when
  T > kv_heads);
* during a refresh, one bucket of full tensors (`rollout.bucket_mb`) plus at most one decoder layer (buckets
  are cut between decoder layers only: vLLM needs a layer's fused groups, for MoE all its experts, in one
  call, so a MoE layer of all experts is the refresh's floor: 1.1 GiB for Qwen3-30B-A3B, 4.6 GiB for
  Qwen3-235B-A22B in bf16).
Mixture of experts (Qwen3-30B-A3B, Qwen3-235B-A22B): the Megatron shard is the dense part / (TP x PP) plus the
experts / (EP x PP) (expert-TP 1; Adam state of the experts divided over expert-DP = world / (EP x PP)); the
engine holds a 1/T slice of every expert (vLLM's default for MoE at tensor parallelism T).
Activations of the training step are not included (they depend on micro-batch and sequence length, see
benchmarks/bench_step_memory.py where available). Numbers are GiB per rank; "fits" compares the total with
`--gpu-gib`. Pure arithmetic: no torch, no GPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    train_tp: int
    train_pp: int
    world: int
    """A Megatron layout that fits the class on 80 GiB GPUs (TP x PP; DP = world / (TP x PP))."""
    experts: int = 0
    """Mixture of experts: experts per layer (every layer sparse, as in Qwen3-MoE); `ffn` is then each
    expert's intermediate size (moe_intermediate_size)."""
    train_ep: int = 1
    """Megatron expert parallelism (expert-TP 1): experts / EP per rank, expert-DP = world / (EP x PP)."""

    def expert_layer_params(self) -> int:
        return self.experts * 3 * self.hidden * self.ffn

    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        if self.experts:
            return attn + self.expert_layer_params() + self.hidden * self.experts + 2 * self.hidden
        return attn + 3 * self.hidden * self.ffn + 2 * self.hidden

    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + self.layers * self.layer_params() + self.hidden

    def layout(self) -> str:
        ep = f"xEP{self.train_ep}" if self.experts else ""
        dp = self.world // (self.train_tp * self.train_pp)
        return f"TP{self.train_tp}xPP{self.train_pp}{ep}, DP{dp} ({self.world} GPUs)"


MODELS = (
    Shape("Qwen3-8B", 36, 4096, 32, 8, 128, 12288, 151936, False, 2, 1, 8),
    Shape("Qwen3-32B", 64, 5120, 64, 8, 128, 25600, 151936, False, 4, 2, 16),
    Shape("72B-class (Qwen2.5-72B)", 80, 8192, 64, 8, 128, 29568, 152064, False, 8, 2, 32),
    Shape("Qwen3-30B-A3B", 48, 2048, 32, 4, 128, 768, 151936, False, 2, 1, 16, experts=128, train_ep=8),
    Shape("Qwen3-235B-A22B", 94, 4096, 64, 4, 128, 1536, 151936, False, 4, 4, 64, experts=128, train_ep=16),
)


def per_rank_gib(m: Shape, engine_tp: int, seqs: int, max_len: int, bucket_mb: float) -> dict[str, float]:
    """GiB per rank of each part for model `m` at engine TP `engine_tp` (see module doc)."""
    p = m.params()
    expert_p = m.layers * m.expert_layer_params()  # 0 for dense models
    shard = (p - expert_p) / (m.train_tp * m.train_pp)
    expert_shard = expert_p / (m.train_ep * m.train_pp)
    dp = m.world // (m.train_tp * m.train_pp)
    edp = m.world // (m.train_ep * m.train_pp)
    kv_token = 2 * m.layers * max(1, m.kv_heads // engine_tp) * m.head_dim * 2
    out = {
        "megatron_full": (shard * (2 + 4 + 12 / dp) + expert_shard * (2 + 4 + 12 / edp)) / GIB,
        "megatron_lora": (shard + expert_shard) * 2 / GIB,
        "engine_weights": p * 2 / engine_tp / GIB,
        "kv_cache": seqs * max_len * kv_token / GIB,
        "refresh": (bucket_mb * 2**20 + m.layer_params() * 2) / GIB,
    }
    out["total_lora"] = out["megatron_lora"] + out["engine_weights"] + out["kv_cache"] + out["refresh"]
    out["total_full"] = out["megatron_full"] + out["engine_weights"] + out["kv_cache"] + out["refresh"]
    return out


def table(seqs: int, max_len: int, bucket_mb: float, gpu_gib: float, engine_tps=(1, 2, 4, 8)) -> str:
    """The markdown table printed by `main` (also pasted into docs/architecture.md)."""
    head = ("model (params)", "Megatron layout", "engine TP", "engines", "Megatron full / LoRA",
            "engine weights", "KV cache", "refresh", "total LoRA", "total full FT")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in MODELS:
        layout = m.layout()
        for t in engine_tps:
            g = per_rank_gib(m, t, seqs, max_len, bucket_mb)

            def fit(x: float) -> str:
                return f"{x:.1f}" + ("" if x <= gpu_gib else " ✗")

            lines.append(
                f"| {m.name} ({m.params() / 1e9:.1f}B) | {layout} | {t} | {m.world // t} | "
                f"{g['megatron_full']:.1f} / {g['megatron_lora']:.1f} | {g['engine_weights']:.1f} | "
                f"{g['kv_cache']:.1f} | {g['refresh']:.2f} | {fit(g['total_lora'])} | "
                f"{fit(g['total_full'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=32, help="sequences in flight per engine (default 32)")
    ap.add_argument("--max-len", type=int, default=9216, help="prompt + response tokens (recipes: 9216)")
    ap.add_argument("--bucket-mb", type=float, default=256.0, help="rollout.bucket_mb (default 256)")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory; totals above it get ✗")
    args = ap.parse_args()
    print(f"GiB per rank; {args.seqs} sequences x {args.max_len} tokens of KV cache per engine, bf16, "
          f"bucket {args.bucket_mb:g} MiB; ✗ = over {args.gpu_gib:g} GiB\n")  # fmt: skip
    print(table(args.seqs, args.max_len, args.bucket_mb, args.gpu_gib))


if __name__ == "__main__":
    main()
