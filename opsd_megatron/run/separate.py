"""Set-up of `rollout.placement: separate` on the trainer ranks: which ranks train, the narrowed world, the
engine link and the remote collector (the engine ranks run `run.engine_server.EngineServer` instead).

    narrow_world(cfg)                      # before preflight / process groups: WORLD_SIZE := trainer ranks
    is_engine_rank(cfg)                    # the last engine_replicas x tensor_parallel_size ranks
    collector = remote_collector(cfg, state)   # after the model is built (collective: link on rank 0)

The trainers form a torch.distributed world of their own (ranks [0, T), `WORLD_SIZE` narrowed to T, the
launch's count kept in `OPSD_JOB_WORLD_SIZE`), so Megatron's `initialize_model_parallel` and every trainer
collective run over the trainers only, unchanged; each engine rank has a 1-rank world of its own (vLLM builds
its groups there). The two sides meet on `rollout.link.Link` (trainer rank 0 + engines) and in the job
watchdog, which spans the whole launch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from opsd_megatron.config import ConfigError, OPSDConfig
from opsd_megatron.rollout.link import JOB_WORLD_ENV, Link, SeparateLayout
from opsd_megatron.rollout.refresh.syncer import WeightSyncer
from opsd_megatron.rollout.remote import RemoteCollector

log = logging.getLogger("opsd_megatron")


def layout(cfg: OPSDConfig) -> SeparateLayout:
    """This rank's place in a separate-placement launch (checked: at least one trainer rank)."""
    r = cfg.rollout
    lay = SeparateLayout.from_env(r.engine_replicas * r.tensor_parallel_size)
    if lay.trainers < 1:
        raise ConfigError(
            f"config key 'rollout.engine_replicas': {r.engine_replicas} engine ranks leave no trainer rank "
            f"in a launch of {lay.job_world} processes (placement=separate needs more processes than "
            "engine ranks)."
        )
    return lay


def is_engine_rank(cfg: OPSDConfig) -> bool:
    """True on the ranks that host only an engine (placement=separate)."""
    return cfg.rollout.placement == "separate" and layout(cfg).is_engine


def narrow_world(cfg: OPSDConfig) -> None:
    """On a trainer rank of placement=separate, `WORLD_SIZE` := the trainer count (once; else a no-op)."""
    if cfg.rollout.placement != "separate" or JOB_WORLD_ENV in os.environ:
        return
    lay = layout(cfg)
    os.environ[JOB_WORLD_ENV] = str(lay.job_world)
    os.environ["WORLD_SIZE"] = str(lay.trainers)
    if lay.job_rank == 0:
        log.info("placement separate: ranks 0-%d train, ranks %s host engines", lay.trainers - 1,
                 lay.engine_job_ranks)  # fmt: skip


def job_world_size(world_size: int) -> int:
    """The launch's process count (the trainers' `world_size` plus the engine ranks, when separate)."""
    return int(os.environ.get(JOB_WORLD_ENV) or world_size)


def remote_collector(cfg: OPSDConfig, state: Any) -> RemoteCollector:
    """The trainer side of separate placement for `state` (a `run.setup.RunState`); rank 0 joins the link."""
    lay = layout(cfg)
    timeout_s = 60.0 * cfg.parallel.timeout_minutes  # parallel.timeout_minutes bounds the link's waits too
    link = None
    if state.ps.rank == 0:
        link = Link(0, lay.link_size, peers=lay.engine_job_ranks, timeout_s=timeout_s)
    syncer = WeightSyncer(None, bucket_bytes=int(cfg.rollout.bucket_mb * 2**20), dtype=state.dtype,
                          export_kwargs={"shard_hook": state.shard_hook})  # fmt: skip
    return RemoteCollector(
        cfg, state.ps, state.dp, state.sampler, state.prompts, state.problems, state.tokenizer,
        chunks=state.chunks, syncer=syncer, link=link, ckpt_root=state.ckpt_root,
    )  # fmt: skip


def engine_world() -> None:
    """An engine rank's own 1-rank torch.distributed world (vLLM builds its groups inside it)."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
