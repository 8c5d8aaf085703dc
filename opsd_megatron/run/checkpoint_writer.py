"""How a training checkpoint's tensors reach the disk: Megatron's `torch_dist` writer behind a fully parallel
save strategy, either in the training process (sync) or in a forked writer process (async save).

    request = write_sharded(sd, path, async_save=True)   # collective; None when the write is done already
    PENDING.schedule(request, finish)    # forks the writer; `finish()` runs on every rank after all wrote
    PENDING.poll()                       # collective, every step: finalize a save whose writers all finished
    PENDING.wait()                       # collective: block until the pending save is finalized
    PENDING.abandon()                    # not collective (error paths): kill the writer, leave it incomplete

Fully parallel: `FullyParallelSaveStrategyWrapper` over the data-parallel group spreads the writing of
DP-replicated tensors (the weights, and the optimizer state without the distributed optimizer) evenly over
the replicas instead of having DP rank 0 write them all; it exchanges metadata only (an all_gather_object).

Async: `dist_checkpointing.save(..., async_sharded_save=True)` plans the save (collectives), writes
`common.pt` and returns an `AsyncRequest`; `AsyncCallsQueue` forks a process per rank that writes this rank's
`.distcp` files (on CPU the fork is the snapshot: later in-place updates of the parameters are copy-on-write
and do not reach the writer; on GPU Megatron stages the tensors to host memory first). Megatron's finalize
functions (the `.metadata` index and `metadata.json`, after the write results are gathered) and then
`finish` (opsd_state.json with checksums, `latest`) run on every rank once all ranks' writers have finished,
at a `poll()` or `wait()`. So until then the directory has no opsd_state.json and `checkpoint_index` treats
it as incomplete; a SIGKILL during the write leaves it so. The writer process dies with its trainer
(`run.lifeline`), and ignores the trainer's stop signals like the trainer does (the handlers are inherited).
Only one save is in flight: a new save (and the end of the run) waits for the previous one.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.util import register_after_fork
from typing import Any

from opsd_megatron.run.lifeline import die_with_parent, parent_lifeline

log = logging.getLogger(__name__)


def save_strategy() -> Any:
    """Megatron's `torch_dist` save strategy, writes spread over the data-parallel replicas."""
    from megatron.core import parallel_state as mps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    group = mps.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy("torch_dist", 1), group)


class _Writer:
    """The writer process, as multiprocessing's after-fork registry holds it (weakly: `_WRITER` keeps it)."""

    def __init__(self) -> None:
        self.pid = os.getpid()


_WRITER: list[_Writer] = []


def _die_with_writer(writer: _Writer) -> None:
    """Run in every process multiprocessing starts from the writer (`register_after_fork`): Megatron's
    `FileSystemWriterAsync` forks its own write workers, and a worker orphaned by a SIGKILLed writer would
    wait on its queue forever. The writer starts them from its main thread."""
    die_with_parent(writer.pid, True)


def _writer_main(lifeline: tuple[int, bool], fn: Callable, *args, **kwargs) -> None:
    """The forked writer process: die with the trainer (a SIGKILLed rank leaves no writer behind), and make
    the write workers it forks die with it (`_die_with_writer`); write."""
    die_with_parent(*lifeline)
    _WRITER[:] = [_Writer()]
    register_after_fork(_WRITER[0], _die_with_writer)
    fn(*args, **kwargs)


def write_sharded(sd: dict, path: str, *, async_save: bool) -> Any:
    """Save the sharded state dict `sd` to `path` (collective over the world). Sync: every file Megatron
    writes is written, returns None. Async: returns the `AsyncRequest` for `PENDING.schedule` (only
    `common.pt` is written yet)."""
    from megatron.core import dist_checkpointing

    extra = {}
    if async_save and "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        extra["async_strategy"] = "mcore"  # megatron-core >= 0.19 defaults to "nvrx" (nvidia-resiliency-ext)
    request = dist_checkpointing.save(
        sd, path, sharded_strategy=save_strategy(), async_sharded_save=async_save, **extra
    )
    if request is not None and request.async_fn is not None:
        request = request._replace(async_fn=partial(_writer_main, parent_lifeline(), request.async_fn))
    return request


class PendingSave:
    """The (at most one) async checkpoint save in flight on this rank; every method but `abandon` is a
    collective over the world (all ranks schedule and poll the same saves)."""

    def __init__(self) -> None:
        self.queue: Any = None
        self.path: str | None = None
        self.started = 0.0

    @property
    def active(self) -> bool:
        return self.queue is not None and self.queue.get_num_unfinalized_calls() > 0

    def schedule(self, request: Any, finish: Callable[[], None], path: str) -> None:
        """Start the writer of `request`; `finish()` runs on every rank after every rank's write ended."""
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        if self.active:
            raise RuntimeError(f"an async checkpoint save ({self.path}) is still in flight")
        if self.queue is None:
            self.queue = AsyncCallsQueue(persistent=False)
        request.add_finalize_fn(finish)
        self.path, self.started = path, time.perf_counter()
        self.queue.schedule_async_request(request)

    def poll(self, *, blocking: bool = False) -> bool:
        """Finalize the pending save if every rank's writer is done (or wait for it with `blocking`);
        returns True when nothing is pending afterwards. One all_reduce when a save is pending, else none."""
        if not self.active:
            return True
        t0 = time.perf_counter()
        self.queue.maybe_finalize_async_calls(blocking=blocking)
        if self.active:
            return False
        log.debug(
            "async checkpoint %s finalized %.1f s after it started (waited %.1f s)",
            self.path, time.perf_counter() - self.started, time.perf_counter() - t0,
        )  # fmt: skip
        return True

    def wait(self) -> None:
        """Block until the pending save (if any) is complete on disk, opsd_state.json included."""
        self.poll(blocking=True)

    def abandon(self) -> None:
        """Kill this rank's writer without finalizing (the run is failing): the directory stays incomplete."""
        if self.active:
            log.warning("abandoning the unfinished async checkpoint save %s (it stays incomplete)", self.path)
            for call in self.queue.async_calls:  # Megatron's close(abort=True) kills only persistent workers
                call.async_caller.close(abort=True)
            self.queue = None


PENDING = PendingSave()
"""This process's async checkpoint save in flight (one training run per process)."""
