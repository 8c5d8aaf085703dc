"""An engine rank of `rollout.placement: separate`: a rollout engine serving trainer rank 0's commands.

    server = make_trainer(cfg)    # on the engine ranks (run.separate.is_engine_rank): an EngineServer
    server.train()                # serve until ("stop",); returns []
    server.exit_process()         # opsd-train: the engine shut down, then os._exit(0) (see below)
    server.close()                # otherwise (tests, an error)

Start-up: the replica's own world (`run.separate.engine_world`: its `rollout.tensor_parallel_size` ranks),
the job watchdog over the whole launch (an exception here ends the trainers too, with this rank named), the
engine (the trainer's `start_engine`: same seed, same sizes, vLLM TP over the replica's world), then the
links (`rollout.link`: commands, and the weight link of every job rank). The loop answers
the commands of `rollout.remote` in the order they come, every rank of a replica in vLLM's lockstep: weights
(this rank's shard, shard-exact), generate (the replica's contiguous share of the step's prompts with their
per-request seeds; rank 0 of the replica answers), eval_generate (the replica's strided share of one call
of the periodic evaluation that trainer rank 0 runs, `rollout.link_spread`; rank 0 of the replica answers),
stop. Stop signals are recorded, not obeyed: the trainers decide when the run ends and say stop.

Exit: after ("stop",) an engine rank holds nothing to save. `opsd-train` calls `exit_process`: the engine's
own shutdown (vLLM's, which also removes its CPU TP shared-memory segments), the logs flushed, then
`os._exit(0)`, skipping the interpreter's teardown of vLLM, torch and transformers (garbage collection and
module finalisation: ~4 s of the ~8 s an engine rank took from "stop" to its end on the 2-core dev machine,
and CPU-bound, so ~10x that on a machine loaded 10x; docs/performance.md "Engine exit"). A child process of
this rank (none with the in-process engine) keeps the ordinary exit, logged once. An engine rank blocked in a
link op still ends by the link's timeout (`parallel.timeout_minutes`) or by the job watchdog.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path
from types import SimpleNamespace

from opsd_megatron.config import OPSDConfig
from opsd_megatron.mcore.dtypes import torch_dtype
from opsd_megatron.mcore.versions import check_versions
from opsd_megatron.rollout.link import Link
from opsd_megatron.rollout.link_spread import EVAL_GENERATE, eval_share
from opsd_megatron.rollout.placement import EnginePlacement
from opsd_megatron.rollout.remote import receive_weights
from opsd_megatron.run.preflight import bound_cpu_kv_cache
from opsd_megatron.run.separate import engine_world, layout, link_timeout_s, weight_syncer
from opsd_megatron.run.setup import start_engine
from opsd_megatron.run.signals import StopSignals
from opsd_megatron.run.watchdog import JobWatchdog, ends_job_on_error, flush_logs

log = logging.getLogger("opsd_megatron")


class EngineServer:
    """One engine rank's whole run (see the module docstring); quacks like `Trainer` for `cli.train`."""

    @ends_job_on_error
    def __init__(self, cfg: OPSDConfig) -> None:
        lay = layout(cfg)
        self.cfg, self.index, self.version = cfg, lay.replica, 0
        self.leader = lay.replica_rank == 0
        self.step = self.start_step = 0
        check_versions(vllm=cfg.rollout.engine == "vllm")
        engine_world(cfg, lay)
        self.watchdog = JobWatchdog.start(lay.job_rank, lay.job_world)
        self.stop_signals = StopSignals(cfg.checkpoint.exit_signal_grace_s, lay.job_rank).install()
        self.state = SimpleNamespace(ps=SimpleNamespace(rank=lay.job_rank), out=Path(cfg.output_dir))
        bound_cpu_kv_cache(cfg.rollout.gpu_memory_utilization)
        self.engine = start_engine(cfg)
        self.share = EnginePlacement(cfg.rollout.engine_replicas, lay.replica, 1)
        self.link = Link(
            lay.link_rank, lay.link_size, peers=lay.engine_job_ranks, timeout_s=link_timeout_s(cfg)
        )
        self.syncer = weight_syncer(cfg, self.engine, torch_dtype(cfg.model.dtype), None, -1)

    @property
    def stop_signal(self) -> int | None:
        return None  # recorded only: the trainers end the run

    @ends_job_on_error
    def train(self) -> list[dict]:
        """Serve commands until ("stop",)."""
        while True:
            cmd = self.link.broadcast_object()
            if cmd[0] == "stop":
                return []
            if cmd[0] == "weights":
                if self.syncer is not None:
                    self.syncer.sync([], self.engine)  # this rank's shard only
                else:
                    receive_weights(self.link, self.engine)
                self.version = cmd[1]
            elif cmd[0] == "generate":
                self._generate(*cmd[1:])
            elif cmd[0] == EVAL_GENERATE:
                self._eval_generate(*cmd[1:])

    def _generate(self, step: int, version: int, prompts: list, seeds: list, sampling) -> None:
        if version != self.version:  # the protocol pushes before it asks: a mismatch is a bug, say so
            raise RuntimeError(f"engine {self.index} asked for version {version}, holds {self.version}")
        lo, hi = self.share.prompt_share(len(prompts))
        rows, t0 = [], time.perf_counter()
        if hi > lo:
            outs = self.engine.generate(prompts[lo:hi], sampling, seeds=seeds[lo:hi])
            rows = [(o[0].token_ids, o[0].logprobs, o[0].finish_reason) for o in outs]
        self.step = step
        if self.leader:
            self.link.send_object((step, self.version, rows, time.perf_counter() - t0), dst=0)

    def _eval_generate(self, prompts: list, sampling, seeds: list | None) -> None:
        """This replica's strided share of one periodic-evaluation `generate` call (every rank of the replica
        generates it, in vLLM's lockstep), sent back to the root by the replica's rank 0."""
        mine, my_seeds = eval_share(prompts, seeds, self.cfg.rollout.engine_replicas, self.index)
        outs = self.engine.generate(mine, sampling, seeds=my_seeds) if mine else []
        if self.leader:
            self.link.send_object(outs, dst=0)

    def exit_process(self, exit_fn=os._exit) -> None:
        """After `train` returned (the trainers said stop): `close`, flush the logs, `exit_fn(0)` (module
        docstring); with a live child process, log why and return (the caller exits the ordinary way)."""
        t0 = time.perf_counter()
        children = multiprocessing.active_children()
        if children:
            log.info("engine rank %d: %d child process(es) alive (%s); ordinary exit", self.index,
                     len(children), ", ".join(str(c.pid) for c in children))  # fmt: skip
            return
        self.close()
        log.info("engine %d (job rank %d): stop received, engine shut down in %.1f s; exiting now",
                 self.index, self.state.ps.rank, time.perf_counter() - t0)  # fmt: skip
        flush_logs()
        exit_fn(0)

    def close(self) -> None:
        """Stop the watchdog, shut the engine down."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
