"""A stand-in for the trainer in `slurm/train.sbatch` (OPSD_TRAIN_ENTRY=slurm_probe:main): checks the launch.

Each rank joins a real gloo process group through torchrun's environment (so the rendezvous across the
emulated nodes is exercised), all-reduces its rank, prints one line with what it was started with, then (on
the job's first run only) waits up to PROBE_SECONDS for SIGUSR1/SIGTERM, prints which signal reached it, and
takes PROBE_GRACE seconds to "save" before exiting 0. Used by tests/test_slurm_launch.py to test
the launcher's plumbing (addresses, ranks, signal forwarding, requeue, resume override) in seconds; the real
trainer is tested by tests/test_slurm_train.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main() -> int:
    import torch
    import torch.distributed as dist

    got: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: got.append(s))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    env = os.environ
    print(
        f"probe rank={rank} world={world} local_rank={env['LOCAL_RANK']} node={env.get('SLURMD_NODENAME')} "
        f"sum={int(t.item())} restart={env.get('SLURM_RESTART_COUNT', '0')} omp={env.get('OMP_NUM_THREADS')} "
        f"argv={sys.argv[1:]}",
        flush=True,
    )
    first_run = env.get("SLURM_RESTART_COUNT", "0") == "0"
    deadline = time.monotonic() + (float(env.get("PROBE_SECONDS", "0")) if first_run else 0.0)
    while not got and time.monotonic() < deadline:
        time.sleep(0.2)
    if got:
        print(f"probe rank={rank} got {signal.Signals(got[0]).name}", flush=True)
        time.sleep(float(env.get("PROBE_GRACE", "0")))  # a checkpoint being written
        print(f"probe rank={rank} saved after {signal.Signals(got[0]).name}", flush=True)
    else:
        print(f"probe rank={rank} done", flush=True)
        dist.barrier()
    dist.destroy_process_group()
    return 0
