"""`transformers.generate` rollout engine: the fallback for machines without vLLM, and a reference in tests.

    engine = HFEngine("path/to/hf_dir", dtype="float32", seed=0)
    outs = engine.generate([[1, 2, 3]], SamplingConfig(temperature=1.1, top_k=20))
    engine.update_weights(named_tensors)  # load_state_dict(strict=False) of HF-named tensors
                                          # (MoE: per-expert names go into transformers' fused experts)

Same sampling semantics as the vLLM engine (`opsd_megatron.rollout.sampling.process_logits`: temperature,
min-p, top-k, top-p in vLLM's order) and the same logprobs: log-softmax of the processed logits at the
sampled token (raw logits for greedy). The only logits processor samples the token itself (private
`torch.Generator`s per (prompt, sample index) seeded from `SamplingConfig.seed`: a prompt's samples do not
depend on the batch, and the global RNG is untouched), records its logprob and
forces it through HF's greedy search, so no [b, t, vocab] score history is kept. Prompts (each repeated n
times) are left-padded into one batch; each sample is cut after its first EOS / stop token (kept, finish
reason "stop") or at `max_new_tokens` ("length").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList

from opsd_megatron.rollout.base import RolloutOutput, SamplingConfig
from opsd_megatron.rollout.hf_experts import fused_expert_target
from opsd_megatron.rollout.sampling import process_logits

logger = logging.getLogger(__name__)


class HFEngine:
    """A `transformers` causal LM behind the `RolloutEngine` protocol.

    Args:
        model_dir: HF model directory (config, weights, tokenizer/generation config for EOS and pad ids).
        dtype: "float32" | "bfloat16" | "float16" | "auto".
        seed: default seed when `SamplingConfig.seed` is None.
        device: torch device; default "cuda" when available else "cpu".
        batch_size: prompts per `generate` call (bounds memory).
    """

    kind = "hf"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        seed: int = 0,
        device: str | None = None,
        batch_size: int = 64,
        **_ignored: Any,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"model_dir {str(model_dir)!r} has no config.json (expected an HF model dir)."
            )
        t0 = time.perf_counter()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).to(self.device)
        self.model.eval()
        try:
            gen = GenerationConfig.from_pretrained(str(model_dir))
        except OSError:
            gen = GenerationConfig()
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.model.config.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self.seed = seed
        self.batch_size = batch_size
        self.startup_s = time.perf_counter() - t0

    # ---------------------------------------------------------------- generation
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int] | None = None,
    ) -> list[list[RolloutOutput]]:
        """For every prompt, `sampling.n` samples with the sampled tokens' logprobs; `seeds` (one per
        prompt) overrides `sampling.seed` per request, as in the vLLM engine."""

        out: list[list[RolloutOutput]] = []
        if len(prompt_token_ids) == 0:
            return out
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError(
                "HFEngine.generate: every prompt needs at least one token (got an empty prompt)."
            )
        if seeds is not None and len(seeds) != len(prompt_token_ids):
            raise ValueError(f"generate got {len(seeds)} seeds for {len(prompt_token_ids)} prompts.")
        seed = self.seed if sampling.seed is None else sampling.seed
        per_prompt = [seed] * len(prompt_token_ids) if seeds is None else [int(s) for s in seeds]
        for start in range(0, len(prompt_token_ids), self.batch_size):
            batch = prompt_token_ids[start : start + self.batch_size]
            out.extend(self._generate_batch(batch, sampling, per_prompt[start : start + self.batch_size]))
        return out

    def _generate_batch(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seeds: Sequence[int]
    ):
        n = sampling.n
        rows = [p for p in prompts for _ in range(n)]  # each prompt n times: [b*n]
        max_len = max(len(p) for p in rows)
        ids = torch.full((len(rows), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), max_len), dtype=torch.long)
        for i, p in enumerate(rows):
            ids[i, max_len - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, max_len - len(p) :] = 1
        stop_ids = list(dict.fromkeys(self.eos_ids + list(sampling.stop_token_ids)))
        greedy = sampling.temperature < 1e-5
        generators = [
            torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + j)
            for seed in seeds
            for j in range(n)
        ]
        step_logprobs: list[torch.Tensor] = []

        def sample_here(input_ids, scores):  # scores [b*n, v] raw logits of this step
            # We sample (or take the argmax) ourselves and hand HF's greedy search a one-hot row, so the
            # logprob of the chosen token is recorded without keeping [b*n, t, v] scores around.
            logits = process_logits(scores, sampling)  # [b*n, v] float32
            logp = logits.log_softmax(dim=-1)
            if greedy:
                tok = logits.argmax(dim=-1)  # [b*n]
            else:
                # exponential-race sampling, one RNG stream per row: a prompt's samples do not depend on
                # the rest of the batch (like vLLM's per-request seed)
                noise = torch.stack([torch.empty_like(logp[0]).exponential_(generator=g) for g in generators])
                tok = (logp.exp() / noise).argmax(dim=-1)  # [b*n]
            step_logprobs.append(logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1).cpu())
            forced = torch.full_like(scores, -float("inf"))
            return forced.scatter_(-1, tok.unsqueeze(-1), 0.0)

        cfg = GenerationConfig(
            do_sample=False,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=self.pad_id,
            temperature=None,
            top_k=None,
            top_p=None,
            min_p=None,
        )
        with torch.no_grad():
            seqs = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=cfg,
                logits_processor=LogitsProcessorList([sample_here]),
            )
        new = seqs[:, max_len:].cpu()  # [b*n, t]
        logps = torch.stack(step_logprobs, dim=1)[:, : new.shape[1]]  # [b*n, t]
        stop = set(stop_ids)
        outs: list[list[RolloutOutput]] = []
        for i in range(len(prompts)):
            samples = []
            for j in range(n):
                row = new[i * n + j].tolist()
                end, reason = len(row), "length"
                for t, tok in enumerate(row):
                    if tok in stop:
                        end, reason = t + 1, "stop"
                        break
                lps = logps[i * n + j, :end].tolist()
                samples.append(RolloutOutput(token_ids=row[:end], logprobs=lps, finish_reason=reason))
            outs.append(samples)
        return outs

    # ------------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors into the model in place (any subset); unknown names are an error."""
        params = dict(self.model.named_parameters(remove_duplicate=False))  # tied lm_head.weight included
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:  # MoE: per-expert checkpoint names -> slices of the fused experts
                    target = fused_expert_target(name, params)
                    if target is not None:
                        target.copy_(tensor)
                        continue
                    raise KeyError(f"update_weights: tensor {name!r} is not a parameter of the HF model.")
                if tuple(params[name].shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(params[name].shape)}."
                    )
                params[name].copy_(tensor)

    def sleep(self) -> None:
        """No-op: the HF engine keeps its weights resident."""

    def wake_up(self) -> None:
        """No-op."""

    def close(self) -> None:
        """Drop the model."""
        self.model = None
