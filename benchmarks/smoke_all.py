"""Every benchmark script in its smoke mode, on CPU, in one process tree: what `make test` runs
(tests/test_benchmarks_smoke.py), so a benchmark cannot rot unnoticed.

    .venv/bin/python benchmarks/smoke_all.py [--only NAME ...] [--json results.json]

The heavy imports (torch, Megatron-core, transformers, vLLM, opsd_megatron) are paid once here; then each
script runs in a fork of this process (`runpy`, as `python benchmarks/<script> <args>` would), its stdout and
stderr in a log, under a time limit. A script passes when it exits 0 and its output holds the line that marks
its table (`SMOKES[name][1]`). Prints one row per script (exit status, seconds, table found) and exits 1 when
any failed; `--json` writes the rows and each log's tail.

A new script in benchmarks/ must be added to SMOKES (the test checks that every script is listed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SMOKES: dict[str, tuple[list[str], str]] = {
    # script: (arguments, a line of its table/verdict that must be printed)
    "bench_loss.py": (["--smoke"], "ours fused, clip"),
    "bench_moe.py": (["--smoke"], "experts/rank"),
    "bench_refresh.py": (["--smoke"], "refresh/copy"),
    "bench_step_memory.py": (["--smoke"], "worst new/old ratio"),
    "bench_bucketing.py": (["--smoke"], "largest relative gradient difference"),
    "bench_eval.py": (["--smoke"], "all engines / one engine"),
    "bench_export.py": (["--smoke"], "files identical:"),
    "bench_checkpoint.py": (["--smoke"], "lean checkpoint"),
    "bench_async.py": (["--smoke"], "separate s1 / colocated"),
    "step_memory_table.py": (["--smoke"], "| **total** |"),
    "gpu_foundation_check.py": (["--smoke"], "PASS: Megatron (opsd_megatron loader) vs transformers"),
    "gpu_loss_check.py": (["--smoke"], "phases: "),
    "gpu_loss_profile.py": (["--smoke"], "chunk 16: "),
    "gpu_step_check.py": (["--smoke"], "plain Megatron student fwd+bwd"),
    "learning.py": (["--smoke"], "smoke: PASS"),
}
"""Not scripts: thresholds.py (a module), smoke_all.py (this runner), gpu_checks.sh (`make gpu-test`)."""

LIMIT_S = 600
"""Per-script limit (a hung script fails instead of stalling `make test`)."""


def _preimport() -> None:
    """The imports every script pays, once, before the forks."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONWARNINGS="ignore")  # fmt: skip
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import megatron.core  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import opsd_megatron.run.trainer  # noqa: F401

    with contextlib.suppress(ImportError):  # without vLLM bench_refresh's smoke fails with its own message
        import vllm  # noqa: F401


def _child(script: str, args: list[str], log: Path) -> None:
    """In the fork: run `script` as __main__ with `args`, stdout/stderr into `log`; never returns."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.setpgid(0, 0)  # its own process group: a timeout ends the script's helpers too
    code = 1
    try:
        sys.argv = [str(HERE / script), *args]
        sys.path.insert(0, str(HERE))
        runpy.run_path(str(HERE / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code)
    except BaseException:
        import traceback

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_one(name: str, args: list[str], marker: str, logdir: Path) -> dict:
    """Fork, run `name` with `args`, wait up to LIMIT_S; the row of the results table."""
    log = logdir / f"{name}.log"
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(name, args, log)
    rc = None
    while rc is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
        elif time.perf_counter() - t0 > LIMIT_S:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rc = "timeout"
        else:
            time.sleep(0.1)
    out = log.read_text(errors="replace")
    return {"name": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "table": marker in out,
            "ok": rc == 0 and marker in out, "tail": out[-3000:]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(SMOKES), help="run only these scripts")
    ap.add_argument("--json", help="write the results (rows and log tails) to this file")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    _preimport()
    t_import = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory(prefix="opsd_bench_smoke_") as tmp:
        for name in a.only or SMOKES:
            args, marker = SMOKES[name]
            rows.append(run_one(name, [x.format(tmp=tmp) for x in args], marker, Path(tmp)))
            r = rows[-1]
            table = "yes" if r["table"] else "NO"
            print(f"{name:<26} rc={r['rc']!s:<8} {r['seconds']:>7.1f} s  table {table}", flush=True)
            if not r["ok"]:
                print("  " + "\n  ".join(r["tail"].splitlines()[-25:]), flush=True)
    total = time.perf_counter() - t0
    failed = [r["name"] for r in rows if not r["ok"]]
    print(f"benchmark smoke: {len(rows) - len(failed)}/{len(rows)} passed in {total:.1f} s "
          f"(imports {t_import:.1f} s); " + (f"FAILED: {failed}" if failed else "PASS"))  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "seconds": total, "imports_s": t_import}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
