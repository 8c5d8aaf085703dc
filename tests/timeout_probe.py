"""A deliberately hung rank, for test_watchdog.py's process-group timeout test (run under torchrun, world 2):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/timeout_probe.py CFG.yaml \\
        parallel.timeout_minutes=0.05

Start-up goes through the trainer's own `run.setup.start` (config key -> `mcore.parallel.initialize` -> the
groups' timeout, the job watchdog); then rank 1 sleeps instead of entering a barrier that rank 0 waits in.
Rank 0's barrier times out after `parallel.timeout_minutes`, `ends_job_on_error` raises it as
`CollectiveTimeout` naming the key, `run.errors.ErrorReport` prints the job's one line, and the watchdog
ends rank 1 (still asleep) at once. Rank 0 prints `waited <seconds>` before failing.
"""

from __future__ import annotations

import sys
import time

from opsd_megatron.run.errors import ErrorReport


def main() -> int:
    report = ErrorReport("opsd-train")
    try:
        import torch.distributed as dist

        from opsd_megatron.config import load_config
        from opsd_megatron.run.setup import start
        from opsd_megatron.run.watchdog import ends_job_on_error

        cfg = load_config(sys.argv[1], sys.argv[2:])
        report.output_dir = cfg.output_dir
        ps = start(cfg)[0]

        @ends_job_on_error
        def hang_or_wait() -> None:
            if ps.rank == 1:
                time.sleep(300)  # hung: never reaches the barrier
            t0 = time.monotonic()
            try:
                dist.barrier()
            finally:
                print(f"waited {time.monotonic() - t0:.1f}", file=sys.stderr, flush=True)

        hang_or_wait()
    except BaseException as e:
        return report.fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
