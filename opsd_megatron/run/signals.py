"""Stop requests from signals: SIGTERM, SIGUSR1 (SLURM preemption) and SIGINT (Ctrl-C) all mean
"finish this step, save a checkpoint, exit 0"; a second Ctrl-C exits at once (exit code 130, no save).

    stop = StopSignals(grace_s=120.0, rank=0).install()   # main thread only
    ...
    if stop.signum is not None: save and leave;  stop.cancel()
    if any_rank_stopped(stop, world_size): ...     # the ranks agree (a signal may reach only some)

A save that cannot finish within `grace_s` after the first signal ends the process (128 + signum) rather
than be killed mid-write later. A SIGINT that follows the first one within `REPEAT_WINDOW_S` is not a second
Ctrl-C but the same one forwarded (torchrun passes the terminal's SIGINT on to its workers, which already
received it from the terminal), so it is ignored. Under torchrun the agent SIGKILLs its workers 30 s after
forwarding a signal; the save must fit in that (SLURM preemption goes through SIGTERM and the grace time).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

REPEAT_WINDOW_S = 1.0
"""A SIGINT within this many seconds of the first one is the same Ctrl-C forwarded, not a second one."""


class StopSignals:
    """Records the first stop signal; exits at once on a second Ctrl-C; bounds the save by `grace_s`."""

    def __init__(self, grace_s: float, rank: int = 0) -> None:
        self.grace_s = float(grace_s)
        self.rank = rank
        self.signum: int | None = None
        self._first_at = 0.0
        self._timer: threading.Timer | None = None

    def install(self) -> StopSignals:
        """Install the handler for SIGTERM, SIGUSR1 and SIGINT (no-op off the main thread)."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            self._first_at = time.monotonic()
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.warning(
                "rank %d: %s: finishing this step, saving a checkpoint and exiting (grace %.0f s%s)",
                self.rank, what, self.grace_s, "; Ctrl-C again to exit now without saving"
                if signum == signal.SIGINT else "",
            )  # fmt: skip
            self._timer = threading.Timer(self.grace_s, lambda: os._exit(128 + signum))
            self._timer.daemon = True
            self._timer.start()
        elif signum == signal.SIGINT and time.monotonic() - self._first_at >= REPEAT_WINDOW_S:
            os.write(2, f"rank {self.rank}: second Ctrl-C: exiting now, without saving\n".encode())
            os._exit(130)

    def cancel(self) -> None:
        """Stop the grace timer (the save finished)."""
        if self._timer is not None:
            self._timer.cancel()


def any_rank_stopped(stop: StopSignals, world_size: int) -> bool:
    """True on every rank when any rank has received a stop signal. Collective: one all-reduce MAX over the
    world (skipped at world size 1)."""
    flag = torch.tensor([1 if stop.signum is not None else 0], dtype=torch.int32)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
