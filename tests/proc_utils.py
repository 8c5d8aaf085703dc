"""Find the processes of one test run by an environment marker, to check that none outlives the run.

    env = {**ENV, **run_marker()}             # pass to run_distributed / subprocess: children inherit it
    assert wait_gone(env, 30) == []           # after the run's processes were killed or exited

Processes whose parent died are re-parented (to init or a subreaper), so a run's orphans cannot be found by
parentage; every descendant inherits the environment, so the marker finds them. Zombies count as gone.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

MARKER = "OPSD_TEST_RUN_ID"


def run_marker() -> dict[str, str]:
    """A fresh `{OPSD_TEST_RUN_ID: uuid}` environment entry."""
    return {MARKER: uuid.uuid4().hex}


def marked_processes(env: dict[str, str]) -> list[int]:
    """Live (non-zombie) pids whose environment holds `env`'s marker, other than this process."""
    needle = f"{MARKER}={env[MARKER]}".encode() + b"\0"
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle not in (d / "environ").read_bytes() + b"\0":
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours
            continue
        if state != "Z":
            found.append(int(d.name))
    return found


def wait_gone(env: dict[str, str], timeout_s: float) -> list[int]:
    """Wait up to `timeout_s` for every marked process to end; returns those still alive (killed after)."""
    deadline = time.monotonic() + timeout_s
    while (left := marked_processes(env)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # leave nothing behind on the shared machine, but report them
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    return left
