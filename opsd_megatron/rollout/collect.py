"""One step's rollouts: which problems, which seeds, which engine samples what, and this replica's slice.

    prompts = PromptCache(tokenizer, problems, cfg.prompts, privileged=cfg.teacher.privileged,
                          seed=cfg.train.seed)
    collector = RolloutCollector(cfg, ps, dp, placement, sampler, prompts, problems, tokenizer)
    samples, stats = collector.collect(engine, step)   # collective over the world

The step's problems are a pure function of (seed, step) (`data.PromptSampler`). Engine e generates its
contiguous share of the global batch (`rollout.placement.EnginePlacement.prompt_share`); every rank of the
engine generates the same prompts with the same per-request seeds (`rollout.placement.request_seed`, a pure
function of (seed, step, global prompt index), so a resumed run samples exactly what the uninterrupted one
did). The engine's first rank grades its share against the reference answers (a free signal, never used for
training); each rank then receives from the engines' first ranks exactly its data-parallel replica's
contiguous slice of the global batch (`rollout.routing`: point-to-point, only the overlaps of engine shares
and replica slices), so every rank of a replica packs the same micro-batches and no rank holds responses it
does not train on. Prompts are rendered on every rank (cheap, deterministic) and cached per problem.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from opsd_megatron.config import ConfigError, OPSDConfig, PromptConfig, RolloutConfig
from opsd_megatron.data import Problem, PromptSampler
from opsd_megatron.data.prompts import derangement, render_pair, shown_solution
from opsd_megatron.evaluation.grader import default_pool
from opsd_megatron.mcore.parallel import ParallelState
from opsd_megatron.rollout.base import RolloutEngine, Sample, SamplingConfig
from opsd_megatron.rollout.placement import EnginePlacement, request_seed
from opsd_megatron.rollout.routing import exchange, routes


def sampling_config(r: RolloutConfig, seed: int | None = None) -> SamplingConfig:
    """The rollouts' sampling settings (`rollout.*`), one sample per prompt."""
    return SamplingConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, min_p=r.min_p,
                          max_new_tokens=r.max_new_tokens, n=1, seed=seed)  # fmt: skip


class PromptCache:
    """Token ids of problem `idx`'s (student, teacher) prompts, rendered once, checked against
    `prompts.max_prompt_tokens` (a row that does not fit is a `ConfigError` naming the row). The teacher is
    shown what `teacher.privileged` says (`data.prompts.shown_solution`); under "shuffled" problem i's
    teacher sees the solution of problem `derangement(len(problems), seed)[i]` (never its own)."""

    def __init__(
        self, tokenizer: Any, problems: list[Problem], cfg: PromptConfig, *, privileged: bool | str,
        seed: int = 0,
    ):  # fmt: skip
        self.tokenizer, self.problems, self.cfg, self.privileged = tokenizer, problems, cfg, privileged
        self._ids: dict[int, tuple[list[int], list[int]]] = {}
        self._perm = None
        if privileged == "shuffled":
            if len(problems) < 2:
                raise ConfigError(
                    f"teacher.privileged=shuffled shows each teacher another problem's solution: needs at "
                    f"least 2 training problems, data has {len(problems)}."
                )
            self._perm = derangement(len(problems), seed)

    def __call__(self, idx: int) -> tuple[list[int], list[int]]:
        if idx not in self._ids:
            p = self.problems[idx]
            sol = shown_solution(self.privileged, self.problems, idx, self._perm)
            s, t = render_pair(self.tokenizer, p.problem, sol, self.cfg, privileged=self.privileged)
            limit = self.cfg.max_prompt_tokens
            if max(len(s), len(t)) > limit:
                raise ConfigError(
                    f"data row {p.row}: the {'teacher' if len(t) > len(s) else 'student'} prompt has "
                    f"{max(len(s), len(t))} tokens, more than prompts.max_prompt_tokens={limit}."
                )
            self._ids[idx] = (s, t)
        return self._ids[idx]


class RolloutCollector:
    """The step's rollouts on this rank's engine, gathered over the world; see the module docstring."""

    def __init__(
        self, cfg: OPSDConfig, ps: ParallelState, dp: int, placement: EnginePlacement, sampler: PromptSampler,
        prompts: PromptCache, problems: list[Problem], tokenizer: Any,
    ):  # fmt: skip
        self.seed, self.sampling = cfg.train.seed, sampling_config(cfg.rollout)
        self.ps, self.dp, self.placement, self.sampler = ps, dp, placement, sampler
        self.prompts, self.problems, self.tokenizer = prompts, problems, tokenizer
        self.group = ps.cpu_group  # gloo over the world: the responses travel as Python objects
        self.replica_of = [ps.dp_rank]  # data-parallel replica of every rank (one all_gather, here)
        if ps.world_size > 1:
            self.replica_of = [0] * ps.world_size
            dist.all_gather_object(self.replica_of, ps.dp_rank, group=self.group)

    def collect(self, engine: RolloutEngine, step: int) -> tuple[list[Sample], dict[str, float]]:
        """This replica's samples of `step` and their stats (`rollout/response_length`,
        `rollout/truncation_rate`, `rollout/accuracy`: means over the replica). Collective over the world:
        point-to-point from the engines' first ranks, each rank receiving only its replica's slice."""
        idx = self.sampler.indices(step)  # the global batch, in global order
        pl = self.placement
        lo, hi = pl.prompt_share(len(idx))
        rows: list = []
        correct: list = []
        if hi > lo:
            seeds = [request_seed(self.seed, step, j) for j in range(lo, hi)]
            outs = engine.generate([self.prompts(i)[0] for i in idx[lo:hi]], self.sampling, seeds=seeds)
            rows = [(o[0].token_ids, o[0].logprobs, o[0].finish_reason) for o in outs]
            if pl.is_leader:
                correct = self.grade(idx[lo:hi], [row[0] for row in rows])
        shares = [pl.prompt_share(len(idx), e) for e in range(pl.num_engines)]
        slices = [self.replica_slice(len(idx), d) for d in range(self.dp)]
        a, b = slices[self.ps.dp_rank]  # this replica's slice
        drivers = [pl.engine_ranks(e)[0] for e in range(pl.num_engines)]
        parts = routes(shares, slices, drivers, self.replica_of)

        def part_of_share(p: Any) -> tuple[list, list]:  # on this engine's driver: rows [p.lo, p.hi)
            return rows[p.lo - lo : p.hi - lo], correct[p.lo - lo : p.hi - lo]

        got = exchange(self.ps.rank, parts, part_of_share, self.group)
        rows = [r for g in got for r in g[0]]
        correct = [c for g in got for c in g[1]]
        return self.slice_samples(idx[a:b], rows, correct)

    def replica_samples(
        self, idx: list[int], rows: list, correct: list
    ) -> tuple[list[Sample], dict[str, float]]:
        """This replica's slice of the step's GLOBAL `rows` ((ids, logprobs, finish reason) per prompt of
        `idx`, in global order) and `correct` verdicts, as samples with their stats (separate placement:
        rollout/remote.py receives every row from the engines)."""
        a, b = self.replica_slice(len(idx), self.ps.dp_rank)
        return self.slice_samples(idx[a:b], rows[a:b], correct[a:b])

    def replica_slice(self, n: int, replica: int) -> tuple[int, int]:
        """Rows [a, b) of data-parallel `replica` in a global batch of `n` prompts (equal, contiguous)."""
        per = n // self.dp
        return replica * per, (replica + 1) * per

    def slice_samples(
        self, idx: list[int], rows: list, correct: list
    ) -> tuple[list[Sample], dict[str, float]]:
        """Samples of this replica's problems `idx` from their `rows` and verdicts, with the stats of
        `collect`."""
        prompts = [self.prompts(i) for i in idx]
        samples = [
            Sample(s, t, list(ids), list(lps), truncated=(fr == "length"))
            for (s, t), (ids, lps, fr) in zip(prompts, rows)
        ]
        graded = [c for c in correct if c is not None]
        stats = {
            "rollout/response_length": sum(len(x.response) for x in samples) / len(samples),
            "rollout/truncation_rate": sum(x.truncated for x in samples) / len(samples),
            "rollout/accuracy": (sum(graded) / len(graded)) if graded else float("nan"),
        }
        return samples, stats

    def grade(self, idx: list[int], responses: list[list[int]]) -> list[bool | None]:
        """Rollout correctness of problems `idx` against their reference answers (None: no answer)."""
        answers = [self.problems[i].answer for i in idx]
        if all(a is None for a in answers):
            return [None] * len(idx)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        pairs = [(t, a) for t, a in zip(texts, answers) if a is not None]
        verdicts = iter(v.correct for v in default_pool().grade_many(pairs))
        return [next(verdicts) if a is not None else None for a in answers]
