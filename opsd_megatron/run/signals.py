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

`checkpoint.stop_deadline_s` (`StopDeadline`): after a stop signal the checkpoint must be written within that
many seconds. At the step's safe points (after the rollout, when packing; before the optimizer update) every
rank asks whether finishing the step (the last steps' duration minus the time spent in this one) and then
saving (the last save's duration; a quarter of the deadline before the first save) still fits; if any rank's
answer is no, every rank raises `StepAbandoned`: nothing of the step has reached the weights, the optimizer
or the schedule (before the update the gradients are zeroed), and the loop saves the last completed step
(unless it is already saved) and exits. Between the safe points a step is not interrupted: the micro-batches
of Megatron's pipeline schedule are in flight between stages.

    deadline = StopDeadline(stop, deadline_s=60.0, world_size=ws)
    deadline.step_started(); ...; deadline.safe_point("before the optimizer step"); ...
    deadline.step_finished()
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

STEP_HISTORY = 3
"""The step-time estimate is the longest of the last this many steps."""
FIRST_SAVE_SHARE = 0.25
"""Before any save was timed, a save is assumed to take this share of the deadline."""

REPEAT_WINDOW_S = 1.0
"""A SIGINT within this many seconds of the first one is the same Ctrl-C forwarded, not a second one."""


class StopSignals:
    """Records the first stop signal; exits at once on a second Ctrl-C; bounds the save by `grace_s`."""

    def __init__(self, grace_s: float, rank: int = 0) -> None:
        self.grace_s = float(grace_s)
        self.rank = rank
        self.signum: int | None = None
        self.first_at = 0.0
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
            self.first_at = time.monotonic()
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.warning(
                "rank %d: %s: finishing this step, saving a checkpoint and exiting (grace %.0f s%s)",
                self.rank, what, self.grace_s, "; Ctrl-C again to exit now without saving"
                if signum == signal.SIGINT else "",
            )  # fmt: skip
            self._timer = threading.Timer(self.grace_s, lambda: os._exit(128 + signum))
            self._timer.daemon = True
            self._timer.start()
        elif signum == signal.SIGINT and time.monotonic() - self.first_at >= REPEAT_WINDOW_S:
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


class StepAbandoned(Exception):
    """The step in progress was given up to meet `checkpoint.stop_deadline_s` (raised on every rank)."""


class StopDeadline:
    """`checkpoint.stop_deadline_s`: whether the step in progress can still finish and be saved in time.

    Fed by the loop (`step_started`, `step_finished`, `save_took`); asked at the step's safe points
    (`safe_point`, collective). Inert (no collective) without a deadline."""

    def __init__(self, stop: StopSignals, deadline_s: float | None, world_size: int) -> None:
        self.stop, self.deadline_s, self.world_size = stop, deadline_s, world_size
        self._steps: list[float] = []
        self._save_s: float | None = None
        self._t0 = time.monotonic()

    def step_started(self) -> None:
        self._t0 = time.monotonic()

    def step_finished(self) -> None:
        self._steps = [*self._steps, time.monotonic() - self._t0][-STEP_HISTORY:]

    def save_took(self, seconds: float) -> None:
        self._save_s = seconds

    def would_miss(self, now: float | None = None) -> bool:
        """True when this rank has a stop signal and finishing the step, then saving, ends after the
        deadline (no step finished yet: its remaining time counts as 0)."""
        if self.deadline_s is None or self.stop.signum is None:
            return False
        now = time.monotonic() if now is None else now
        remaining = max(max(self._steps, default=0.0) - (now - self._t0), 0.0)
        save = self._save_s if self._save_s is not None else FIRST_SAVE_SHARE * self.deadline_s
        return now + remaining + save > self.stop.first_at + self.deadline_s

    def safe_point(self, where: str) -> None:
        """Raise `StepAbandoned` on every rank when any rank `would_miss` the deadline. Collective: one
        all-reduce MAX over the world (none without a deadline or at world size 1)."""
        if self.deadline_s is None:
            return
        flag = torch.tensor([1 if self.would_miss() else 0], dtype=torch.int32)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            log.warning("rank %d: stop signal: the step in progress would end after "
                        "checkpoint.stop_deadline_s=%.0f s; abandoning it %s",
                        self.stop.rank, self.deadline_s, where)  # fmt: skip
            raise StepAbandoned(where)
