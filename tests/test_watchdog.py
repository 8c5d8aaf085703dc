"""One rank's exception ends every rank of the job (opsd_megatron.run.watchdog), over a real gloo world: rank
1
raises while rank 0 waits in a barrier that would otherwise block for gloo's 30-minute timeout."""

from __future__ import annotations

import time

import pytest
from dist_utils import run_distributed


def _raise_on_rank1(rank, world_size):
    import torch.distributed as dist

    from opsd_megatron.run.watchdog import JobWatchdog, ends_job_on_error

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    wd = JobWatchdog.start(rank, world_size)
    assert wd is not None

    @ends_job_on_error
    def work():
        if rank == 1:
            time.sleep(1.0)
            raise RuntimeError("injected failure on rank 1")
        dist.barrier()  # rank 1 never arrives
        return "rank 0 passed a barrier rank 1 never reached"

    return work()


def test_exception_on_one_rank_ends_every_rank_quickly(capfd):
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="injected failure on rank 1"):
        run_distributed(_raise_on_rank1, 2, timeout=120)
    assert time.monotonic() - t0 < 60
    err = capfd.readouterr().err
    assert "rank 0: ending because rank 1: RuntimeError: injected failure on rank 1" in err, err[-3000:]


def test_hung_rank_ends_the_job_after_parallel_timeout_minutes(tiny_qwen3_dir, tmp_path):
    """Rank 1 sleeps (300 s) instead of entering a barrier: with `parallel.timeout_minutes=0.05` (3 s)
    rank 0's barrier raises within seconds, the job's one error line names the key, and the job ends long
    before the sleep would (tests/timeout_probe.py, under torchrun, world 2, gloo)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from proc_utils import run_marker, wait_gone
    from test_trainer import tiny_config

    root = Path(__file__).resolve().parent.parent
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_qwen3_dir, tmp_path / "run", parallel={"tp": 1})))
    env = {
        **os.environ,
        **run_marker(),
        "PYTHONPATH": str(root),
        "TMPDIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "tests" / "timeout_probe.py"), str(cfg), "parallel.timeout_minutes=0.05"]  # fmt: skip
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    finally:
        assert wait_gone(env, 10) == [], "a rank outlived the launcher"
    elapsed = time.monotonic() - t0
    assert p.returncode != 0, p.stderr[-3000:]
    waited = [float(m) for m in re.findall(r"^waited ([\d.]+)$", p.stderr, re.M)]
    assert len(waited) == 1 and 2.5 <= waited[0] < 30, p.stderr[-3000:]  # 3 s, plus a loaded machine
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("opsd-train: ")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "CollectiveTimeout" in lines[0] and "parallel.timeout_minutes" in lines[0], lines[0]
    assert elapsed < 250, elapsed  # ended by the timeout, not by rank 1 waking up after 300 s


def test_collective_timeouts_are_named_after_the_key():
    from opsd_megatron.run.watchdog import CollectiveTimeout, as_collective_timeout, ends_job_on_error

    gloo = RuntimeError(
        "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation"
    )
    nccl = RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, ...)")
    for e in (gloo, nccl, RuntimeError("Application timeout caused pair closure")):
        t = as_collective_timeout(e)
        assert isinstance(t, CollectiveTimeout) and "parallel.timeout_minutes" in str(t), t
    other = ValueError("bad row")
    assert as_collective_timeout(other) is other

    @ends_job_on_error  # no watchdog running: only the conversion
    def stuck():
        raise gloo

    with pytest.raises(CollectiveTimeout, match="parallel.timeout_minutes") as info:
        stuck()
    assert info.value.__cause__ is gloo
