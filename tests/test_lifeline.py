"""No helper process outlives its parent: a SIGKILLed process's checkpoint-writer Manager (which ignores
SIGTERM) and its math-verify grader worker (busy in a sympy computation that never returns) end within
30 s. Real multiprocessing Manager via Megatron's checkpoint module, real GraderPool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from proc_utils import marked_processes, run_marker, wait_gone

_CHILD = textwrap.dedent(
    """
    import multiprocessing as mp, sys
    from opsd_megatron.run.checkpointing import _start_writer_manager_shielded
    from opsd_megatron.evaluation.grader import GraderPool

    _start_writer_manager_shielded()            # Megatron's writer Manager, SIGTERM ignored
    pool = GraderPool(num_workers=1, timeout_s=600.0)
    assert pool.verify_many([("1/2", "0.5")]) == [(True, "math_verify")]
    print("children", *[p.pid for p in mp.active_children()], flush=True)
    pool.verify_many([("9^{9^{9^{9}}}", "1")])   # the worker never returns from this
    """
)


def test_manager_and_grader_worker_die_with_a_sigkilled_parent():
    env = {**os.environ, **run_marker(), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("children"), line
        children = [int(x) for x in line.split()[1:]]
        assert len(children) >= 2, children  # the Manager and the grader worker
        time.sleep(1.0)  # the worker is inside the endless computation now
        assert set(children) <= set(marked_processes(env))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = wait_gone(env, 30.0)
    assert left == [], f"processes outlived their SIGKILLed parent: {left}"
