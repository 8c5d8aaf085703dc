"""Rollouts from engines on ranks of their own (`rollout.placement: separate`), trainer side, and the weight
stream to them.

    collector = RemoteCollector(cfg, ps, dp, sampler, prompts, problems, tokenizer, chunks=, syncer=, link=)
    samples, stats = collector.collect(None, step)   # collective over the trainers; rank 0 talks to engines
    collector.step_metrics                           # rollout/staleness, rollout/version, time/wait_rollout_s
    collector.evaluate(step, run_eval)               # periodic evaluation spread over every engine

Protocol (root = trainer rank 0 on the `rollout.link.Link`; every command is broadcast to every engine):
* ("weights", v): the shard-exact stream follows (vLLM engines, `syncer` a `ShardSyncer` over the
  `WeightLink` of every job rank: each trainer rank sends the slabs of its own shards, each engine rank
  receives only its own shard, one all-to-all per bucket); or, for the HF engine, buckets of full tensors
  from the root over the link (`LinkEngine.update_weights`: a header of names, shapes, dtypes, then one flat
  tensor per dtype), ended by a None header. The engines then hold version v.
* ("generate", step, v, prompts, seeds, sampling): replica e (every rank of it, in vLLM's lockstep)
  generates its contiguous share (`EnginePlacement.prompt_share`); its rank 0 sends (step, v, rows,
  generation seconds) back to the root.
* ("eval_generate", prompts, sampling, seeds): one `generate` call of the periodic evaluation, which trainer
  rank 0 runs (`rollout.link_spread.LinkSpread`): replica e (every rank, in lockstep) generates its strided
  share and its rank 0 sends it back.
* ("stop",): the engines leave their loop.
Weight version v = optimizer steps applied (= the trainer's step counter). Step n trains on a batch made by
version n at `max_staleness` 0 (push, request n, wait) and by version max(n-1, 0) at 1: the root first takes
batch n (requested during step n-1), pushes version n, requests batch n+1 and trains while the engines
generate it. Pushes and requests only happen while the engines wait for a command, so no send ever meets a
send. A batch staler than `max_staleness` is refused (`StaleRolloutError`). The batch in flight at a
checkpoint is taken and saved next to it (`inflight_path`), so a resumed run trains on what the
uninterrupted one did (regenerating it would need version n-1's weights, which no longer exist).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opsd_megatron.config import OPSDConfig
from opsd_megatron.data import Problem, PromptSampler
from opsd_megatron.mcore.parallel import ParallelState
from opsd_megatron.rollout.base import RolloutEngine, Sample
from opsd_megatron.rollout.collect import PromptCache, RolloutCollector
from opsd_megatron.rollout.link import Link
from opsd_megatron.rollout.link_spread import LinkSpread
from opsd_megatron.rollout.placement import EnginePlacement, request_seed
from opsd_megatron.rollout.refresh.shard_sync import ShardSyncer
from opsd_megatron.rollout.refresh.syncer import WeightSyncer


class StaleRolloutError(RuntimeError):
    """A rollout batch was made by weights older than `rollout.max_staleness` allows."""


@dataclass
class RolloutBatch:
    """One step's global rollouts with the weight version that made them."""

    step: int
    version: int
    rows: list  # per global prompt: (token ids, logprobs, finish reason)
    correct: list  # per global prompt: bool | None
    generate_s: float = 0.0  # the slowest engine's generation time


def inflight_path(ckpt_root: Path, step: int) -> Path:
    """Where the batch in flight at the checkpoint of `step` is kept (outside the checkpoint directory)."""
    return Path(ckpt_root) / "inflight" / f"step_{step:06d}.pt"


class LinkEngine:
    """The root's stand-in for the engines in `WeightSyncer`: `update_weights` broadcasts one bucket."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        named = list(named_tensors)
        self.link.broadcast_object([(n, tuple(t.shape), str(t.dtype)) for n, t in named])
        for dtype in sorted({t.dtype for _, t in named}, key=str):
            flat = torch.cat([t.detach().reshape(-1).cpu() for _, t in named if t.dtype == dtype])
            self.link.broadcast_tensor(flat)

    def wake_up(self) -> None:
        """The engines are never asleep in separate placement."""


def receive_weights(link: Link, engine: RolloutEngine) -> int:
    """Engine side of one ("weights", v) command: load buckets until the None header; returns bytes."""
    nbytes = 0
    while (header := link.broadcast_object()) is not None:
        tensors: dict[str, torch.Tensor] = {}
        for dtype_name in sorted({d for _, _, d in header}):
            dtype = getattr(torch, dtype_name.removeprefix("torch."))
            items = [(n, s) for n, s, d in header if d == dtype_name]
            flat = link.broadcast_tensor(torch.empty(sum(_numel(s) for _, s in items), dtype=dtype))
            for (n, s), part in zip(items, flat.split([_numel(s) for _, s in items])):
                tensors[n] = part.view(s)
            nbytes += flat.numel() * flat.element_size()
        engine.update_weights([(n, tensors[n]) for n, _, _ in header])
    return nbytes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class RemoteCollector(RolloutCollector):
    """`RolloutCollector` whose rollouts come from the separate engines (module docstring). All trainer ranks
    run the same bookkeeping; only rank 0 (`link` not None) talks to the engines and broadcasts the batch."""

    def __init__(
        self, cfg: OPSDConfig, ps: ParallelState, dp: int, sampler: PromptSampler, prompts: PromptCache,
        problems: list[Problem], tokenizer: Any, *, chunks: list, syncer: WeightSyncer | ShardSyncer,
        link: Link | None, ckpt_root: Path,
    ):  # fmt: skip
        one = EnginePlacement(ps.world_size, ps.rank, ps.world_size)  # rank 0 "leads" all trainers
        super().__init__(cfg, ps, dp, one, sampler, prompts, problems, tokenizer)
        self.cfg, self.chunks, self.syncer, self.link, self.ckpt_root = cfg, chunks, syncer, link, ckpt_root
        self.staleness, self.engines = cfg.rollout.max_staleness, cfg.rollout.engine_replicas
        self.leaders = [1 + e * cfg.rollout.tensor_parallel_size for e in range(self.engines)]  # link ranks
        self.engine_version = 0  # the engines start from the HF weights
        self.in_flight: int | None = None  # the step whose batch the engines are making
        self.held: RolloutBatch | None = None  # a batch taken early (evaluation, checkpoint, resume)
        self.step_metrics: dict[str, float] = {}
        self.eval_requests: list[int] = []  # requests per engine of the last periodic evaluation (rank 0)

    # ---------------------------------------------------------------- the step's batch
    def collect(self, engine: RolloutEngine | None, step: int) -> tuple[list[Sample], dict[str, float]]:
        """This replica's samples of `step` (see the module docstring for which version made them).
        Collective over the trainers (the weight export, one broadcast of the batch)."""
        t0 = time.perf_counter()
        push_s = 0.0
        if self.in_flight != step and (self.held is None or self.held.step != step):
            push_s += self._make_current(step)
            self._request(step, step)
        batch = self._take(step)
        if self.staleness and step + 1 < self.cfg.train.steps:
            push_s += self._make_current(step)  # the engines generate step + 1 while we train step
            self._request(step + 1, step)
        if step - batch.version > self.staleness:
            raise StaleRolloutError(
                f"the rollouts of step {step} were made by weight version {batch.version}, "
                f"{step - batch.version} steps old; rollout.max_staleness={self.staleness} allows at most "
                f"{self.staleness}."
            )
        self.step_metrics = {
            "rollout/staleness": float(step - batch.version), "rollout/version": float(batch.version),
            "time/refresh_s": push_s, "time/wait_rollout_s": time.perf_counter() - t0 - push_s,
            "time/engine_generate_s": batch.generate_s,
        }  # fmt: skip
        return self.replica_samples(self.sampler.indices(step), batch.rows, batch.correct)

    def _make_current(self, version: int) -> float:
        """Push the trainer's weights (version `version`) to the engines unless they hold it. Collective."""
        if self.engine_version == version:
            return 0.0
        t0 = time.perf_counter()
        if self.link is not None:
            self.link.broadcast_object(("weights", version))
        if isinstance(self.syncer, ShardSyncer):  # every trainer rank sends its own slabs
            self.syncer.sync(self.chunks, None)
        else:
            self.syncer.sync(self.chunks, LinkEngine(self.link) if self.link is not None else None)
            if self.link is not None:
                self.link.broadcast_object(None)  # end of the stream
        self.engine_version = version
        return time.perf_counter() - t0

    def _request(self, step: int, version: int) -> None:
        """Ask every engine for its share of `step`'s rollouts (root only sends; all ranks book it)."""
        if self.link is not None:
            idx = self.sampler.indices(step)
            seeds = [request_seed(self.seed, step, j) for j in range(len(idx))]
            prompts = [self.prompts(i)[0] for i in idx]
            self.link.broadcast_object(("generate", step, version, prompts, seeds, self.sampling))
        self.in_flight = step

    def _take(self, step: int) -> RolloutBatch:
        """`step`'s batch: held, or received from the engines by the root, graded there, broadcast to the
        other trainers. Collective over the trainers."""
        if self.held is not None and self.held.step == step:
            batch, self.held = self.held, None
            return batch
        batch = None
        if self.link is not None:
            rows, version, gen_s = [], None, 0.0
            for e, leader in enumerate(self.leaders):
                got_step, version, share, seconds = self.link.recv_object(src=leader)
                assert got_step == step, f"engine {e} answered step {got_step}, expected {step}"
                rows.extend(share)
                gen_s = max(gen_s, seconds)
            correct = self.grade(list(self.sampler.indices(step)), [r[0] for r in rows])
            batch = RolloutBatch(step, version, rows, correct, gen_s)
        if self.ps.world_size > 1:
            box = [batch]
            dist.broadcast_object_list(box, src=0)
            batch = box[0]
        self.in_flight = None
        return batch

    # ---------------------------------------------------------------- evaluation, checkpoints, end
    def hold_in_flight(self) -> None:
        """Take the batch in flight now (before a push or an evaluation). Collective over the trainers."""
        if self.in_flight is not None:
            self.held = self._take(self.in_flight)

    def evaluate(self, step: int, run_eval: Callable[[LinkSpread], dict[str, float]]) -> dict[str, float]:
        """Periodic evaluation of version `step` spread over every engine (`rollout.link_spread`): rank 0
        calls `run_eval(spread)` (the evaluation, which writes its files there); `eval/...` metrics on rank 0,
        {} elsewhere. Collective over the trainers."""
        self.hold_in_flight()
        self._make_current(step)
        out: dict[str, float] = {}
        if self.link is not None:
            spread = LinkSpread(self.link, self.leaders)
            try:
                out = run_eval(spread)
            finally:
                spread.log_requests()
                self.eval_requests = spread.requests
        if self.ps.world_size > 1:
            dist.barrier()
        return out

    def before_save(self, step: int) -> None:
        """Checkpoint of `step`: the batch in flight (staleness 1) is taken and written next to it."""
        self.hold_in_flight()
        if self.held is not None and self.ps.rank == 0:
            path = inflight_path(self.ckpt_root, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(vars(self.held), path)

    def resume(self, step: int) -> None:
        """After resuming at `step`: the saved in-flight batch, if any, is the one step `step` trains on."""
        path = inflight_path(self.ckpt_root, step)
        if self.staleness and path.is_file():
            self.held = RolloutBatch(**torch.load(path, weights_only=False))

    def close(self) -> None:
        """Drain a batch in flight, then end the engines' loop (root)."""
        if self.in_flight is not None and self.link is not None:
            for leader in self.leaders:
                self.link.recv_object(src=leader)
            self.in_flight = None
        if self.link is not None:
            self.link.broadcast_object(("stop",))
            self.link = None
