"""Set-up of `rollout.placement: separate` on the trainer ranks: which ranks train, the narrowed world, the
engine link and the remote collector (the engine ranks run `run.engine_server.EngineServer` instead).

    narrow_world(cfg)                      # before preflight / process groups: WORLD_SIZE := trainer ranks
    engine_world(cfg, layout(cfg))         # on an engine rank: its replica's own world
    is_engine_rank(cfg)                    # the last engine_replicas x tensor_parallel_size ranks
    collector = remote_collector(cfg, state)   # after the model is built (collective: link on rank 0)

The trainers form a torch.distributed world of their own (ranks [0, T), `WORLD_SIZE` narrowed to T, the
launch's count kept in `OPSD_JOB_WORLD_SIZE`), so Megatron's `initialize_model_parallel` and every trainer
collective run over the trainers only, unchanged; each engine replica (`rollout.tensor_parallel_size`
consecutive engine ranks) has a world of its own (`engine_world`: its store a prefix of the job's, `RANK`
the rank inside the replica; vLLM builds its TP groups there). The two sides meet on `rollout.link.Link`
(commands: trainer rank 0 + every engine rank), on `rollout.link.WeightLink` (weights: every job rank; the
shard-exact stream, each engine rank receiving only its shard) and in the job watchdog, which spans the whole
launch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from opsd_megatron.config import ConfigError, OPSDConfig
from opsd_megatron.mcore.parallel import group_timeout
from opsd_megatron.rollout.link import (
    JOB_RANK_ENV,
    JOB_WORLD_ENV,
    Link,
    SeparateLayout,
    WeightLink,
    replica_store,
)
from opsd_megatron.rollout.refresh.shard_sync import ShardSyncer
from opsd_megatron.rollout.refresh.syncer import WeightSyncer
from opsd_megatron.rollout.remote import RemoteCollector

log = logging.getLogger("opsd_megatron")


def layout(cfg: OPSDConfig) -> SeparateLayout:
    """This rank's place in a separate-placement launch (checked: at least one trainer rank)."""
    r = cfg.rollout
    lay = SeparateLayout.from_env(r.engine_replicas * r.tensor_parallel_size, r.tensor_parallel_size)
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


def link_timeout_s(cfg: OPSDConfig) -> float:
    """Seconds the links and engine worlds wait in one op (`parallel.timeout_minutes`, as every group)."""
    return group_timeout(cfg.parallel.timeout_minutes).total_seconds()


def shard_exact(cfg: OPSDConfig) -> bool:
    """Whether the weights stream shard-exact over `WeightLink` (the vLLM engine: `load_shards`); the HF
    engine (one rank per replica) takes full tensors from trainer rank 0 over the command link."""
    return cfg.rollout.engine == "vllm"


def weight_syncer(cfg: OPSDConfig, engine: Any, dtype: torch.dtype, shard_hook: Any, dp_rank: int) -> Any:
    """Both sides' syncer: a `ShardSyncer` over a new `WeightLink` (collective over every job rank) when
    `shard_exact`, else the trainers' full-tensor `WeightSyncer` (engines: None, they `receive_weights`)."""
    lay, bucket = layout(cfg), int(cfg.rollout.bucket_mb * 2**20)
    if shard_exact(cfg):
        comm = WeightLink(lay.job_rank, lay.job_world, dp_rank=dp_rank, peers=lay.engine_job_ranks,
                          timeout_s=link_timeout_s(cfg))  # fmt: skip
        return ShardSyncer(engine, bucket_bytes=bucket, dtype=dtype, shard_hook=shard_hook, comm=comm)
    if lay.is_engine:
        return None
    log.info("placement separate: full tensors from trainer rank 0 (rollout.engine=%s has no shard load)",
             cfg.rollout.engine)  # fmt: skip
    return WeightSyncer(None, bucket_bytes=bucket, dtype=dtype, export_kwargs={"shard_hook": shard_hook})


def remote_collector(cfg: OPSDConfig, state: Any) -> RemoteCollector:
    """The trainer side of separate placement for `state` (a `run.setup.RunState`); rank 0 joins the link,
    every trainer rank the weight link."""
    lay = layout(cfg)
    link = None
    if state.ps.rank == 0:
        link = Link(0, lay.link_size, peers=lay.engine_job_ranks, timeout_s=link_timeout_s(cfg))
    syncer = weight_syncer(cfg, None, state.dtype, state.shard_hook, state.ps.dp_rank)
    return RemoteCollector(
        cfg, state.ps, state.dp, state.sampler, state.prompts, state.problems, state.tokenizer,
        chunks=state.chunks, syncer=syncer, link=link, ckpt_root=state.ckpt_root,
    )  # fmt: skip


def engine_world(cfg: OPSDConfig, lay: SeparateLayout) -> None:
    """An engine replica's own torch.distributed world (its `rollout.tensor_parallel_size` ranks; vLLM builds
    its groups inside it): gloo on the replica's prefix of the job store (`rollout.link.replica_store`),
    `RANK` := the rank inside the replica (vLLM's `external_launcher` reads it), the job rank kept in
    `OPSD_JOB_RANK`. Collective over the replica."""
    if torch.distributed.is_initialized():
        return
    os.environ[JOB_RANK_ENV] = str(lay.job_rank)
    os.environ[JOB_WORLD_ENV] = str(lay.job_world)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(lay.replica_rank), str(lay.engine_tp)
    timeout_s = link_timeout_s(cfg)
    store = replica_store(lay.replica, timeout_s) if lay.engine_tp > 1 else torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=lay.replica_rank, world_size=lay.engine_tp,
                                         timeout=group_timeout(cfg.parallel.timeout_minutes))  # fmt: skip
