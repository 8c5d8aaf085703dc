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
