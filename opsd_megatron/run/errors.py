"""One error, once: how `opsd-train` reports a failure under torchrun, srun or a plain `python`.

    report = ErrorReport("opsd-train", verbose=args.verbose)
    report.output_dir = cfg.output_dir        # once the config loaded: details go to <output_dir>/logs/
    try: ...
    except BaseException as e:
        return report.fail(e)                 # one line on ONE rank's stderr; returns the exit code

Exit codes: 2 for a usage error (`USER_ERRORS`: a config key, a path, a data file), 130 for Ctrl-C during
start-up, 1 for anything else. Every failing rank writes the full traceback to its detail log,
`<output_dir>/logs/rank<N>.log` when output_dir already exists (a start-up error creates nothing there), else
`$TMPDIR/opsd-train-<job>/rank<N>.log` (`detail_path`); `--verbose` also prints it.

Which rank prints: global rank 0 when it has an error, else the first rank that has one. The ranks agree
through the job's rendezvous store (MASTER_ADDR:MASTER_PORT: torchrun's agent store, or the store rank 0
hosts once torch.distributed is up; the job watchdog's when one runs): rank 0 claims the report at once, any
other rank waits `claim_wait_s` for rank 0's claim before claiming itself; the ranks that do not print wait
until the printing rank has printed (torchrun ends every rank as soon as one exits). Without a reachable
store (srun before torch.distributed started) rank 0 prints and the others stay silent. The ranks the job
watchdog ends (`opsd_megatron.run.watchdog`) wait for the same "printed" mark and leave quietly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from opsd_megatron.config import ConfigError
from opsd_megatron.data import DataError
from opsd_megatron.mcore.layout import env_rank, env_world_size

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError)
"""Errors the user can fix (a key, a flag, a path, a data row): exit code 2, the message alone."""

details = logging.getLogger("opsd_megatron.details")
"""Tracebacks and the watchdog's messages: the detail log only (and stderr with --verbose) once an
`ErrorReport` exists in the process; before that they reach the root logger."""

ONE_LINE_REPORTS = [False]
"""[True] once an `ErrorReport` prints this process's failure (other ranks then wait for its line)."""
_JOB_STORE: list[Any] = [None]
"""The running job watchdog's store (`use_store`), reused for the report."""


def use_store(store: Any) -> None:
    """The job watchdog's rendezvous store (None when it stops)."""
    _JOB_STORE[0] = store


def _prefix() -> str:
    # torchrun's agent store lives across elastic restarts: keys of an earlier attempt must not count
    return f"opsd_watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def report_keys() -> tuple[str, str, str]:
    """Store keys of the one error line: (which rank prints, printed, the failing rank's exit code)."""
    p = _prefix()
    return p + "report_claim", p + "report_printed", p + "exit_code"


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, USER_ERRORS):
        return 2
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return 1


def detail_path(output_dir: str | os.PathLike | None, rank: int) -> Path:
    """`<output_dir>/logs/rank<rank>.log` when output_dir exists and takes a logs/ folder, else a folder of
    this job (SLURM job, torchrun run or process id) under the temp dir."""
    if output_dir is not None and Path(output_dir).is_dir():
        logs = Path(output_dir).absolute() / "logs"
        with contextlib.suppress(OSError):
            logs.mkdir(exist_ok=True)
            if os.access(logs, os.W_OK):
                return logs / f"rank{rank}.log"
    env = os.environ
    job = env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID") or f"pid{os.getppid()}"
    d = Path(tempfile.gettempdir()) / f"opsd-train-{job}"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"rank{rank}.log"


class _DetailHandler(logging.Handler):
    """Appends records to `detail_path(report.output_dir, rank)`, choosing the file at the first record."""

    def __init__(self, report: ErrorReport) -> None:
        super().__init__(logging.DEBUG)
        self.report = report
        self.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        record.rank = self.report.rank
        try:
            path = self.report.log_path()
            with path.open("a", encoding="utf-8") as f:
                f.write(self.format(record) + "\n")
        except Exception:  # a detail log that cannot be written must not hide the error line itself
            self.handleError(record)


class ErrorReport:
    """Prints one line for the job's failure (see the module docstring); `fail` returns the exit code."""

    def __init__(self, prog: str, *, verbose: bool = False, claim_wait_s: float = 2.0, print_wait_s=10.0):
        self.prog, self.verbose = prog, verbose
        self.rank, self.world = env_rank(), env_world_size()
        self.output_dir: str | None = None
        self.claim_wait_s, self.print_wait_s = claim_wait_s, print_wait_s
        self._path: Path | None = None
        ONE_LINE_REPORTS[0] = True
        details.propagate = False
        details.handlers = [_DetailHandler(self)]
        if verbose:
            details.addHandler(logging.StreamHandler(sys.stderr))
        details.setLevel(logging.DEBUG)

    def log_path(self) -> Path:
        if self._path is None:
            self._path = detail_path(self.output_dir, self.rank)
        return self._path

    def line(self, exc: BaseException) -> str:
        """The one line: the message of a usage error, type and rank of anything else, and the detail log."""
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, USER_ERRORS):
            where = f" on rank {self.rank}" if self.world > 1 else ""
            msg = f"error{where}: {type(exc).__name__}: {msg}"
        return f"{self.prog}: {msg} (details: {self.log_path()})"

    def fail(self, exc: BaseException) -> int:
        """Log the traceback to the detail log, print the line when this rank reports, return the code."""
        details.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
        line = self.line(exc)
        store = _job_store(self.world)
        if self._claim(store):
            print(line, file=sys.stderr, flush=True)
            _mark(store, report_keys()[1])
        else:
            wait_for_key(store, report_keys()[1], self.print_wait_s)
        return exit_code(exc)

    def _claim(self, store: Any) -> bool:
        if store is None:
            return self.rank == 0
        claim_key = report_keys()[0]
        try:
            if self.rank != 0:
                wait_for_key(store, claim_key, self.claim_wait_s)
            me = str(self.rank)
            won = store.compare_set(claim_key, "", me)
            return (won.decode() if isinstance(won, bytes) else str(won)) == me
        except Exception:  # the store went away meanwhile
            return self.rank == 0


def _job_store(world: int) -> Any:
    """The job's rendezvous store (the running watchdog's, else a new client), or None."""
    if _JOB_STORE[0] is not None:
        return _JOB_STORE[0]
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world <= 1 or not addr or not port:
        return None
    try:
        import torch.distributed as dist  # function-local: keeps the config-error path of a 1-rank run fast

        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=3),
                             wait_for_workers=False)  # fmt: skip
    except Exception:  # nothing listens (srun before torch.distributed started)
        return None


def wait_for_key(store: Any, key: str, timeout_s: float) -> bool:
    """Whether `key` appeared in `store` within `timeout_s` (False without a store or once it is gone)."""
    deadline = time.monotonic() + timeout_s
    while store is not None:
        try:
            if store.check([key]):
                return True
        except Exception:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return False


def _mark(store: Any, key: str) -> None:
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(key, "1")
