"""Drive every rank of one tensor-parallel engine from a single caller (periodic evaluation on rank 0).

    with leading(engine, group, src=0) as lead:      # on rank 0: an engine whose generate() is mirrored
        periodic_eval(lead, ...)
    follow(engine, group, src=0)                     # on the other ranks of that engine, at the same time

A vLLM engine at TP > 1 needs all its ranks to call `generate` with the same prompts and seeds (each rank
runs its own scheduler and sampler). Code written for one process (the evaluation runner, which resumes from
files only rank 0 reads) runs on the engine's first rank; `leading` broadcasts each `generate` call's
arguments over the engine's gloo group (`broadcast_object_list`) before running it, `follow` replays them on
the other ranks until the leader leaves the `with` block (also on an exception: a None sentinel ends it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch.distributed as dist

from opsd_megatron.rollout.base import RolloutOutput, SamplingConfig


class _MirroredEngine:
    """The leader's view: `generate` is announced to the followers first; everything else passes through."""

    def __init__(self, engine: Any, group: Any, src: int) -> None:
        self._engine, self._group, self._src = engine, group, src

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int] | None = None,
    ) -> list[list[RolloutOutput]]:
        call = ([list(p) for p in prompt_token_ids], sampling, None if seeds is None else list(seeds))
        dist.broadcast_object_list([call], src=self._src, group=self._group)
        return self._engine.generate(*call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@contextlib.contextmanager
def leading(engine: Any, group: Any, src: int) -> Iterator[Any]:
    """Yield `engine` with mirrored `generate`; on exit (even by exception) release the followers."""
    try:
        yield _MirroredEngine(engine, group, src)
    finally:
        dist.broadcast_object_list([None], src=src, group=group)


def follow(engine: Any, group: Any, src: int) -> int:
    """Replay the leader's `generate` calls on this rank's part of the engine; returns how many."""
    calls = 0
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=src, group=group)
        if box[0] is None:
            return calls
        prompts, sampling, seeds = box[0]
        engine.generate(prompts, sampling, seeds)
        calls += 1
