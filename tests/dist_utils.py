"""Run a function on N real processes joined in a gloo process group (CPU), for distributed tests.

    results = run_distributed(fn, world_size=2, *args)

`fn(rank, world_size, *args)` runs in a fresh spawned process with MASTER_ADDR/MASTER_PORT/RANK/
WORLD_SIZE/LOCAL_RANK set (torchrun's variables), so library code initialises torch.distributed exactly as
it does under torchrun. Its return value (anything `torch.save` can write) comes back in rank order. An
exception on any rank fails the caller with that rank's traceback; a hang fails after `timeout` seconds.
`fn` must be importable (module level): it reaches the ranks pickled by reference.

The ranks start from a fork server (`multiprocessing`'s "forkserver" context, one per test session) that has
imported torch, megatron-core, transformers, vLLM and the trainer once (`PRELOAD`): a rank forks from it
instead of paying those imports (~16 CPU-s a rank on the 2-core CI machine). Each rank is still a fresh
process as far as a test can see: the server only imports (it never initialises torch.distributed, builds a
model or runs a test); a rank's environment is reset to the caller's (`os.environ` as `run_distributed` saw
it, plus `env`); its stdout/stderr are the caller's fds 1 and 2, passed along (as a spawned rank inherits
them: pytest's capture, `capfd`); and it imports the test module of `fn` itself. No rank outlives pytest: a
rank follows the caller (`_follow`: a thread that waits on the caller's pidfd and ends the rank when it
exits) and the server (`die_with_parent`: the kernel kills the rank when the server dies); the server leaves
once pytest and every rank are gone (each rank holds the server's lifeline pipe open while it lives).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import tempfile
import threading
import traceback
from multiprocessing import reduction
from pathlib import Path

import torch
import torch.multiprocessing as mp

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PRELOAD = ["torch", "megatron.core", "transformers", "opsd_megatron.run.trainer", "vllm"]
"""What the fork server imports once (an import that fails there is left to the rank, which reports it)."""


def _context():
    """The "forkserver" context with `PRELOAD` (the server starts at the first rank, with one thread per
    library: `run_distributed` sets `_THREAD_VARS` to 1 around the starts)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def error_text(fn) -> str:
    """`fn()`'s exception as "Type: message" ("no error" when it returns): bad-input checks inside spawned
    ranks send the message back to the test."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return f"{type(e).__name__}: {e}"
    return "no error"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CallerFd:
    """The caller's file descriptor `fd`, duplicated into the rank as the rank is started (pickled then);
    it unpickles to the rank's copy (an int)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _inherited_fd, (reduction.DupFd(self.fd),)


def _inherited_fd(dup) -> int:
    return dup.detach()


def _follow(pid: int) -> None:
    """In a rank: leave (`os._exit(1)`) as soon as process `pid` (the caller: pytest) exits, however it
    exits (a SIGKILLed pytest too); the rank is not the caller's child, so the kernel cannot tie them."""

    def wait() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone
            os._exit(1)
        select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=wait, name="opsd-follow-caller", daemon=True).start()


def _worker(fn, rank: int, world_size: int, port: int, out_dir: str, args: tuple, env: dict,
            caller_env: dict, stdio: tuple[int, int], caller_pid: int) -> None:  # fmt: skip
    from opsd_megatron.run.lifeline import die_with_parent

    _follow(caller_pid)
    for fd, caller_fd in zip((1, 2), stdio):  # where the caller's output goes (pytest's capture)
        os.dup2(caller_fd, fd)
        os.close(caller_fd)

    # A killed pytest leaves no rank behind (e.g. ranks blocked in a collective after another one failed):
    # the rank follows the fork server (its parent, single-threaded), which leaves when pytest does.
    die_with_parent(os.getppid(), True)
    os.environ.clear()  # the caller's environment, not the server's (started at an earlier test)
    os.environ.update(caller_env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        **env,
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, env: dict | None = None) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes; return per-rank results."""
    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="opsd_dist_") as out_dir:
        # One intra-op thread in each rank (2-core CI machine; torch, OpenMP and gloo would otherwise start
        # a thread per core in every rank), and in the fork server when this call starts it.
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})
        caller_env = dict(os.environ)
        procs = [
            ctx.Process(
                target=_worker,
                args=(
                    fn,
                    r,
                    world_size,
                    port,
                    out_dir,
                    args,
                    dict(env or {}),
                    caller_env,
                    (_CallerFd(1), _CallerFd(2)),
                    os.getpid(),
                ),
            )
            for r in range(world_size)
        ]
        try:
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline_each = timeout
        for p in procs:
            p.join(deadline_each)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = []
        for r in range(world_size):
            err = Path(out_dir) / f"rank{r}.err"
            if err.exists():
                errors.append(f"--- rank {r} ---\n{err.read_text()}")
        if errors:
            codes = [p.exitcode for p in procs]
            raise AssertionError(f"distributed test failed (exit codes {codes}):\n" + "\n".join(errors))
        if hung:
            raise AssertionError(f"distributed test timed out after {timeout}s on ranks {hung}")
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"distributed test processes exited abnormally: {bad}")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
