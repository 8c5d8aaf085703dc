"""Helper processes that die with their parent: no checkpoint Manager or grader worker outlives its run.

    ctx.Process(target=worker, args=(parent_lifeline(), ...))     # in the parent, when starting the child
    die_with_parent(*lifeline)                                     # first thing in the child
    follow_launcher()                                              # first in a command's main (torchrun)

A helper process (Megatron's checkpoint-writer Manager, math-verify grader workers) is a child of a trainer
rank. When that rank is SIGKILLed (a node dying, `scancel --signal=KILL`) or leaves with `os._exit` (the job
watchdog), nothing runs its clean-up, and a child that ignores SIGTERM or blocks in a long computation lives
on as an orphan. `die_with_parent` makes the child follow its parent in two ways:

* Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`: the kernel kills the child when the thread that started it exits.
  Used only when that thread is the parent's main thread (`parent_lifeline()` records it), since a child
  started from a short-lived worker thread would otherwise be killed when that thread ends.
* A daemon thread in the child that polls `os.getppid()` once a second and leaves (`os._exit`) when the
  parent changed (re-parented to init or a subreaper): the fallback off Linux or for children started from
  other threads. A child that holds the GIL in C code for long cannot run it; the prctl path covers that.

Both check right away whether the parent is already gone (it died before the child got here).

The training ranks themselves follow torchrun's agent the same way (`follow_launcher`): a SIGKILLed
torchrun (an OOM kill, `kill -9` of the launcher) otherwise left its ranks training to the end as orphans.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 1.0


def parent_lifeline() -> tuple[int, bool]:
    """What a child needs to follow this process: (this pid, whether the calling thread is the main one)."""
    return os.getpid(), threading.current_thread() is threading.main_thread()


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(_POLL_S)


def die_with_parent(parent_pid: int, started_by_main_thread: bool = True) -> None:
    """Call in a child process: exit when `parent_pid` dies (see the module docstring).

    Args:
        parent_pid: the pid of the process that started this one (`parent_lifeline()[0]`, taken there).
        started_by_main_thread: whether that process started this one from its main thread; only then is
            the kernel's parent-death signal safe (it fires when the starting *thread* exits).
    """
    if started_by_main_thread:
        _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(0)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="opsd-parent-watch", daemon=True).start()


def follow_launcher() -> bool:
    """Under torchrun, make this process (a rank) die with torchrun's agent; returns whether it does.

    torchrun's agent sets `TORCHELASTIC_RUN_ID` for the ranks it starts, and starts each of them directly
    (`subprocess.Popen`, in a new session) from its main thread (torch 2.x `SubprocessHandler`, called
    from the agent's run loop), so the parent is `os.getppid()` and the kernel's parent-death signal is
    safe. Launched otherwise (srun, plain python) nothing changes. Call it first in a command's `main`:
    an agent that died before that is not noticed."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return False
    die_with_parent(os.getppid(), started_by_main_thread=True)
    return True
