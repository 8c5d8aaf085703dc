"""One rank's exception ends the whole job within seconds, with that exception in every rank's log.

    wd = JobWatchdog.start(rank, world_size)     # after torch.distributed is up (the trainer does this)

    @ends_job_on_error                           # the trainer's __init__ and train()
    def train(self): ...

    wd.stop()                                    # at the end of a run (trainer.close)

Without this, an exception on one rank (a bad row, a full disk, a drift error raised on one rank only) leaves
the other ranks blocked in their next collective until the process groups' timeout
(`parallel.timeout_minutes`, 120 min by default, set by `mcore.parallel`) ends them, and the job holds its
nodes doing nothing meanwhile.
Collectives cannot be interrupted from Python, and a short timeout would also cut legitimate long waits (the
slowest engine's share of an evaluation chunk, rank 0's file writes). So the failure travels on a side channel
instead, within about a second:

* Every rank opens a client of the job's rendezvous TCPStore (MASTER_ADDR:MASTER_PORT: torchrun's agent
  store, or rank 0's store under plain `srun`) and a daemon thread polls one key every `poll_s` seconds.
* The failing rank (`fail`, called by `ends_job_on_error`) logs the full traceback (to its detail log under
  `opsd-train`), sets the key to a one-line
  description, waits up to `ack_wait_s` until every other rank has seen it (so the store outlives the message
  when this rank hosts it), arms a timer that ends this process after `exit_grace_s` whatever its clean-up
  does, and lets the exception propagate (the launcher sees it; `opsd-train` exits non-zero).
* Every other rank's thread sees the key, logs "rank R: ending because <exception>" (to its detail log under
  `opsd-train`), acknowledges, waits until the failing rank printed its one error line (`report_keys`,
  `opsd_megatron.run.errors`), flushes its log handlers and leaves quietly with `os._exit` and the failing
  rank's exit code (its main thread is blocked inside a collective and cannot unwind).

A rank that dies without an exception (SIGKILL, a lost node) is the launcher's business: torchrun stops the
other workers of a failed group, SLURM ends the job step. A rank that hangs without an exception (a deadlock,
a stuck file system) is the timeout's: the ranks waiting for it raise after `parallel.timeout_minutes`
(gloo; `ends_job_on_error` turns that into `CollectiveTimeout`, whose one line names the key) or are aborted
by NCCL's watchdog (GPU, TORCH_NCCL_ASYNC_ERROR_HANDLING=1). Writes of a checkpoint cut short leave `latest`
pointing at the previous complete one (see `opsd_megatron.run.checkpointing`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from opsd_megatron.run import errors
from opsd_megatron.run.errors import details, report_keys

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_ACTIVE: JobWatchdog | None = None


def active() -> JobWatchdog | None:
    """The watchdog of this process, if one is running."""
    return _ACTIVE


def flush_logs() -> None:
    """Flush the root logger's handlers, stdout and stderr (before an `os._exit`)."""
    for stream in [*logging.getLogger().handlers, sys.stdout, sys.stderr]:
        with contextlib.suppress(Exception):  # a broken handler must not keep the process alive
            stream.flush()


class JobWatchdog:
    """Ends every rank of the job when one rank reports an exception (see the module docstring).

    Args:
        store: a `torch.distributed.Store` every rank of the job reaches (keys are namespaced here).
        rank, world_size: this process's global rank and the number of ranks.
        poll_s: how often the watch thread looks for a failure.
        ack_wait_s: how long a failing rank waits for the others to see its message.
        exit_grace_s: a failing rank ends its process this long after reporting, if still alive.
        report_wait_s: how long another rank waits for the failing rank's one error line before leaving.
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        *,
        poll_s: float = 0.5,
        ack_wait_s: float = 5.0,
        exit_grace_s: float = 30.0,
        report_wait_s: float = 10.0,
    ) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.poll_s, self.ack_wait_s, self.exit_grace_s = poll_s, ack_wait_s, exit_grace_s
        self.report_wait_s = report_wait_s
        prefix = errors._prefix()
        self._key, self._acks = prefix + "failed", prefix + "acks"
        self._failing = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="opsd-job-watchdog", daemon=True)

    @classmethod
    def start(cls, rank: int, world_size: int, **kwargs: Any) -> JobWatchdog | None:
        """Connect to the job's rendezvous store (MASTER_ADDR/MASTER_PORT) and start watching.

        Returns None for a one-rank job or when the store cannot be reached (logged once: the job then
        relies on the collectives' own timeouts).
        """
        global _ACTIVE
        if world_size <= 1:
            return None
        import torch.distributed as dist

        try:
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                timeout=timedelta(seconds=30), wait_for_workers=False,
            )  # fmt: skip
        except Exception as e:  # no env rendezvous (e.g. file:// init): no side channel
            log.warning("job watchdog off: cannot reach the rendezvous store (%s: %s); an exception on one "
                        "rank may leave the others waiting in a collective", type(e).__name__, e)  # fmt: skip
            return None
        wd = cls(store, rank, world_size, **kwargs)
        wd._thread.start()
        _ACTIVE = wd
        errors.use_store(store)
        return wd

    # -------------------------------------------------------------- failing rank
    def fail(self, exc: BaseException) -> None:
        """Report `exc` to every rank (they leave), then bound this process's remaining life."""
        if self._failing:
            return
        self._failing = True
        details.error("rank %d failed; ending all %d ranks of the job", self.rank, self.world_size,
                      exc_info=exc)  # fmt: skip
        message = f"rank {self.rank}: {type(exc).__name__}: {exc}".splitlines()[0][:2000]
        try:
            if not errors.ONE_LINE_REPORTS[0]:  # nobody prints a line the other ranks should wait for
                self.store.set(report_keys()[1], "1")
            self.store.compare_set(report_keys()[2], "", str(errors.exit_code(exc)))  # the others' code
            self.store.compare_set(self._key, "", message)  # the first failure wins
            self.store.add(self._acks, 1)
            deadline = time.monotonic() + self.ack_wait_s
            while self.store.add(self._acks, 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(0.1)
        except Exception as e:  # the store is gone: the others learn it from their launcher
            log.warning("job watchdog could not report the failure (%s: %s)", type(e).__name__, e)
        timer = threading.Timer(self.exit_grace_s, self._exit, args=(1,))
        timer.daemon = True
        timer.start()
        flush_logs()

    # ---------------------------------------------------------- the other ranks
    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            try:
                if not self.store.check([self._key]):
                    continue
                message = self.store.get(self._key).decode(errors="replace")
                if self._failing:  # this rank reported (and acknowledged) the failure itself
                    return
                details.error("rank %d: ending because %s", self.rank, message)
                self.store.add(self._acks, 1)
                self._wait_reported()
                code = int(self.store.get(report_keys()[2])) if self.store.check([report_keys()[2]]) else 1
            except Exception:  # the store went away (normal at the end of a run): stop watching
                return
            self._exit(
                code
            )  # the failing rank's: 2 for a usage error, whichever rank the launcher sees first

    def _wait_reported(self) -> None:
        """Until the failing rank printed its line (`run.errors`): torchrun ends every rank once one exits."""
        deadline = time.monotonic() + self.report_wait_s
        key = report_keys()[1]
        while not self.store.check([key]) and time.monotonic() < deadline:
            time.sleep(0.05)

    @staticmethod
    def _exit(code: int) -> None:
        flush_logs()
        os._exit(code)

    def stop(self) -> None:
        """Stop watching (a finished run); idempotent."""
        global _ACTIVE
        self._stopped.set()
        if _ACTIVE is self:
            _ACTIVE = None
            errors.use_store(None)


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than the process groups' timeout (`parallel.timeout_minutes`)."""


_TIMEOUT_MARKS = ("Timed out waiting", "timeout caused pair closure", "collective operation timeout")
"""How gloo (send/recv of a collective, a pair closed by the peer's timeout) and NCCL's watchdog word a
collective that ran past the group's timeout (torch 2.13)."""


def as_collective_timeout(exc: BaseException) -> BaseException:
    """`exc` as a `CollectiveTimeout` naming `parallel.timeout_minutes` when it is a collective's timeout
    (`_TIMEOUT_MARKS`), else `exc` itself."""
    text = str(exc)
    if isinstance(exc, CollectiveTimeout) or not any(m in text for m in _TIMEOUT_MARKS):
        return exc
    return CollectiveTimeout(
        "a collective waited longer than parallel.timeout_minutes (config key): another rank is hung or "
        f"slower than that; raise the key if the wait is legitimate ({text.splitlines()[0] if text else ''})"
    )


def ends_job_on_error(fn: F) -> F:
    """Decorator: an exception escaping `fn` is reported to the job's watchdog (all ranks end), then raised;
    a collective's timeout is raised as `CollectiveTimeout` (naming `parallel.timeout_minutes`).

    `SystemExit(0)` is a normal exit, not a failure; without a running watchdog this does nothing more.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as caught:
            e = as_collective_timeout(caught)
            wd = _ACTIVE
            if wd is not None and not (isinstance(e, SystemExit) and not e.code):
                wd.fail(e)
            if e is caught:
                raise
            raise e from caught

    return wrapper  # type: ignore[return-value]
