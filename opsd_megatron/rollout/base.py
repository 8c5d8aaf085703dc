"""The rollout-engine interface: what the trainer and the evaluator may ask of a generation backend.

A backend (vLLM by default, `transformers.generate` as a fallback) implements `RolloutEngine`; the
factory `opsd_megatron.rollout.make_engine(kind, ...)` builds one, so callers never branch on backend type.
Weights arrive as a stream of `(hf_name, full tensor)` pairs in Hugging Face naming (see
`opsd_megatron.rollout.refresh`), the same names `opsd_megatron.mcore.conversion` exports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class SamplingConfig:
    """Sampling knobs shared by every backend (same semantics as vLLM's `SamplingParams`)."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    max_new_tokens: int = 256
    """Maximum number of generated tokens per sample."""
    n: int = 1
    """Samples per prompt."""
    seed: int | None = None
    """Base seed; None leaves sampling unseeded."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end a sample (the tokenizer's EOS always does)."""


@dataclass
class Sample:
    """One rollout ready to pack (token ids as plain lists)."""

    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int]
    rollout_logprobs: list[float] = field(default_factory=list)
    """Engine log-probabilities of `response` (for the drift metric); may be empty."""
    truncated: bool = False
    """True when generation hit max_new_tokens (the sample is kept)."""


@dataclass
class RolloutOutput:
    """One sample for one prompt."""

    token_ids: list[int]
    """Generated token ids (EOS/stop token included when generation ended on it)."""
    logprobs: list[float]
    """Log-probability of each generated token under the engine's (temperature-scaled) distribution."""
    finish_reason: str
    """"stop" (EOS / stop token) or "length" (hit max_new_tokens)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation backend colocated with a training rank."""

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int] | None = None,
    ) -> list[list[RolloutOutput]]:
        """For every prompt, `sampling.n` samples (outer list: prompts, inner: samples). `seeds`, one per
        prompt, seeds each request on its own (overriding `sampling.seed`)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full, HF-named tensors (any subset of the model) into the engine, in place."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (weights/KV cache) between rollouts; no-op where unsupported."""
        ...

    def wake_up(self) -> None:
        """Undo `sleep()` before the next `generate` / `update_weights`."""
        ...

    def close(self) -> None:
        """Free every resource the engine holds."""
        ...
