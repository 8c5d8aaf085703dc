"""Grade model answers against references: math-verify in killable worker processes, then a string fallback.

    grade(response_text, "\\\\frac{1}{2}")                  # -> bool, one response (shared default pool)
    with GraderPool(num_workers=4, timeout_s=5.0) as pool:
        results = pool.grade_many([(response, reference), ...])   # -> list[GradeResult], in order

Per response: answer = `extract_answer(response)` (the last box, or the union of the final boxes when the
answer is split over several: see extract.py; no box -> wrong, status "no_answer"); if the answer and the
reference are equal after `normalize_answer` (units after a number dropped) it is right without further
work; otherwise math-verify (on the answer with units stripped)
(`parse` both as LaTeX/expressions, `verify(gold, pred)`) runs in a worker process with signal timeouts off
(`parsing_timeout=None`, `timeout_seconds=None`, so it is safe from any thread). The pool enforces the
per-item wall-clock limit itself: a worker that overruns (sympy on `9^{9^{9^{9}}}` never returns, and a
C-level big-integer power cannot even be interrupted by a signal) is killed and replaced, and its item is
graded wrong with status "timeout". Workers are spawned (not forked: the parent may hold vLLM/torch
threads), start once and are reused; grading runs in parallel over `num_workers` processes. A worker exits
when its parent process dies, however it dies (`opsd_megatron.run.lifeline`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait

from opsd_megatron.evaluation.extract import extract_answer, strings_match, strip_units
from opsd_megatron.run.lifeline import die_with_parent, parent_lifeline

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
"""Per-answer math-verify wall-clock limit (the paper's 5 s)."""
_STARTUP_TIMEOUT_S = 300.0  # importing sympy in a fresh process on a heavily loaded CI machine


@dataclass(frozen=True)
class GradeResult:
    """Verdict on one response."""

    correct: bool
    """True when the extracted answer equals the reference (math-verify or the string fallback)."""
    answer: str | None
    """The extracted final answer (last complete `\\boxed{}`, or the final boxes joined with ", "), None when
    there is none."""
    status: str
    """How the verdict was reached: "string_match", "math_verify", "no_answer", "timeout" or "error"."""


# --- math-verify, run inside a worker ----------------------------------------------------------------------


def _as_latex(s: str) -> str:
    s = s.strip()
    if s.startswith("\\boxed") or s.startswith("$"):
        return s
    return f"${s}$"


@functools.lru_cache(maxsize=4096)
def _parse(latex: str) -> tuple:
    """math-verify's parse of one answer string (cached: the reference repeats n times per problem)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse  # heavy (sympy): workers only

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    return tuple(parse(latex, extraction_config=cfg, parsing_timeout=None))


def math_verify_equal(answer: str, reference: str) -> bool:
    """math-verify's verdict on two answer strings (no timeout: call it in a worker or accept the risk)."""
    from math_verify import verify  # heavy (sympy): workers only

    gold, pred = _parse(_as_latex(reference)), _parse(_as_latex(answer))
    if not gold or not pred:
        return False
    return bool(verify(list(gold), list(pred), timeout_seconds=None))


def _worker_main(conn, parent_pid: int, started_by_main_thread: bool) -> None:
    """Worker loop: receive (task_id, answer, reference), send (task_id, correct, status).

    Exits with its parent (`opsd_megatron.run.lifeline`), even while stuck in a computation that never
    returns.
    """
    die_with_parent(parent_pid, started_by_main_thread)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pool
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (heavy, workers only: pay the sympy import before reporting ready)

    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, answer, reference = msg
        try:
            ok = math_verify_equal(answer, reference)
            conn.send((task_id, ok, "math_verify"))
        except Exception as e:  # a parse/verify failure is a wrong answer, not a crashed run
            conn.send((task_id, False, f"error: {type(e).__name__}"))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, *parent_lifeline()), daemon=True)
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.deadline = float("inf")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class GraderPool:
    """A fixed set of spawned math-verify workers with a per-item wall-clock limit (kill and replace)."""

    def __init__(self, num_workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if timeout_s <= 0:
            raise ValueError(f"grader timeout_s must be > 0 seconds, got {timeout_s}.")
        self.num_workers = num_workers or max(1, min(8, os.cpu_count() or 2))
        self.timeout_s = float(timeout_s)
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # one batch at a time: callers from several threads queue up
        self.num_timeouts = 0
        """Items killed for overrunning `timeout_s` since the pool started."""

    def _ensure_workers(self, count: int) -> None:
        """Keep at least `count` (<= num_workers) live workers; they are started lazily, on first need."""
        self._workers = [w for w in self._workers if w.proc.is_alive()]
        if len(self._workers) < min(count, self.num_workers) and mp.current_process().daemon:
            raise RuntimeError(
                "GraderPool cannot start its worker processes from a daemonic process; grade from the main "
                "process or from a non-daemonic multiprocessing.Process."
            )
        while len(self._workers) < min(count, self.num_workers):
            self._workers.append(_Worker(self._ctx))

    def verify_many(
        self, pairs: list[tuple[str, str]], timeout_s: float | None = None
    ) -> list[tuple[bool, str]]:
        """math-verify verdicts for (answer, reference) pairs, in order: (correct, status) each.

        Items run in parallel over the workers; one that exceeds `timeout_s` (default: the pool's) gets
        (False, "timeout") and its worker is killed and replaced, so a batch never takes much longer than
        len(pairs) / num_workers * timeout_s.
        """
        if not pairs:
            return []
        with self._lock:
            try:
                return self._verify_locked(pairs, self.timeout_s if timeout_s is None else float(timeout_s))
            finally:  # after an exception (e.g. KeyboardInterrupt) no worker may carry a stale task along
                for w in [w for w in self._workers if w.task is not None]:
                    w.kill()
                    self._workers.remove(w)

    def _verify_locked(self, pairs: list[tuple[str, str]], limit: float) -> list[tuple[bool, str]]:
        results: list[tuple[bool, str] | None] = [None] * len(pairs)
        todo = deque(range(len(pairs)))
        self._ensure_workers(len(pairs))
        while todo or any(w.task is not None for w in self._workers):
            now = time.monotonic()
            for w in self._workers:  # hand work to idle, ready workers
                if w.ready and w.task is None and todo:
                    w.task = todo.popleft()
                    w.conn.send((w.task, *pairs[w.task]))
                    w.deadline = now + limit
            deadlines = [w.deadline for w in self._workers if w.task is not None]
            deadlines += [w.started + _STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines, default=now + 1.0) - now)
            for conn in wait([w.conn for w in self._workers], timeout=wait_s):
                w = next(w for w in self._workers if w.conn is conn)
                try:
                    task_id, ok, status = conn.recv()
                except (EOFError, OSError):  # the worker died (OOM, segfault): its item is an error
                    if not w.ready:
                        raise RuntimeError(
                            "a math-verify grader worker exited while starting; check that `math_verify` "
                            "imports in a fresh Python process."
                        ) from None
                    if w.task is not None:
                        results[w.task] = (False, "error: worker died")
                    self._replace(w)
                    continue
                if task_id == "ready":
                    w.ready = True
                    continue
                results[task_id] = (bool(ok), status)
                w.task, w.deadline = None, float("inf")
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now > w.deadline:
                    logger.warning("math-verify exceeded %.1fs on item %d; worker killed", limit, w.task)
                    results[w.task] = (False, "timeout")
                    self.num_timeouts += 1
                    self._replace(w)
                elif not w.ready and now > w.started + _STARTUP_TIMEOUT_S:
                    raise RuntimeError(
                        f"a math-verify grader worker did not start within {_STARTUP_TIMEOUT_S:.0f}s; "
                        "check that `math_verify` imports in a fresh Python process."
                    )
        return [r for r in results if r is not None]

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._ctx)

    def grade_many(
        self, items: list[tuple[str | None, str]], timeout_s: float | None = None
    ) -> list[GradeResult]:
        """Grade (response_text, reference) pairs, in order (rules in the module docstring).

        `timeout_s` overrides the pool's per-answer math-verify limit for this call.
        """
        out: list[GradeResult | None] = [None] * len(items)
        need_verify: list[int] = []
        answers: list[str | None] = []
        for i, (response, reference) in enumerate(items):
            answer = extract_answer(response)
            answers.append(answer)
            if answer is None:
                out[i] = GradeResult(False, None, "no_answer")
            elif strings_match(answer, str(reference)):
                out[i] = GradeResult(True, answer, "string_match")
            else:
                need_verify.append(i)
        pairs = [(strip_units(answers[i]), strip_units(str(items[i][1]))) for i in need_verify]
        verdicts = self.verify_many(pairs, timeout_s)
        for i, (ok, status) in zip(need_verify, verdicts):
            out[i] = GradeResult(ok, answers[i], status)
        return [r for r in out if r is not None]

    def close(self) -> None:
        """Stop every worker (they hold no state worth a graceful exit: killed and reaped)."""
        for w in self._workers:
            w.kill()
        self._workers = []

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DEFAULT_POOL: GraderPool | None = None


def default_pool() -> GraderPool:
    """The process-wide pool behind `grade()` and the trainer's rollout accuracy (at most 4 workers, started
    on first need, stopped at interpreter exit)."""
    global _DEFAULT_POOL
    if _DEFAULT_POOL is None:
        _DEFAULT_POOL = GraderPool(num_workers=max(1, min(4, os.cpu_count() or 2)))
        atexit.register(_DEFAULT_POOL.close)
    return _DEFAULT_POOL


def grade(response_text: str | None, reference_answer: str) -> bool:
    """True when the last `\\boxed{}` answer of `response_text` equals `reference_answer`.

    Uses the shared default `GraderPool` (5 s per answer, worker processes); for many responses at once,
    `default_pool().grade_many(...)` grades them in parallel.
    """
    return default_pool().grade_many([(response_text, reference_answer)])[0].correct
