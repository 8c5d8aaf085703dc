"""No helper process outlives its parent: a SIGKILLed process's checkpoint-writer Manager (which ignores
SIGTERM), its async-save writer with the write worker that writer forks (as Megatron's does), and its
math-verify grader worker (busy in a sympy computation that never returns) end within 30 s. Real
multiprocessing Manager via Megatron's checkpoint module, real GraderPool. And no training rank outlives a
SIGKILLed torchrun: the real `torchrun -m opsd_megatron.train` on the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml
from proc_utils import marked_processes, run_marker, wait_gone
from test_trainer import ENV, tiny_config

_CHILD = textwrap.dedent(
    """
    import multiprocessing as mp, sys, time
    from opsd_megatron.run.checkpointing import _start_writer_manager_shielded
    from opsd_megatron.run.checkpoint_writer import _writer_main
    from opsd_megatron.run.lifeline import parent_lifeline
    from opsd_megatron.evaluation.grader import GraderPool

    def _write():  # as Megatron's async writer does: fork its own write worker, wait for it
        worker = mp.get_context("fork").Process(target=time.sleep, args=(600,))
        worker.start()
        worker.join()

    _start_writer_manager_shielded()            # Megatron's writer Manager, SIGTERM ignored
    mp.get_context("fork").Process(target=_writer_main, args=(parent_lifeline(), _write)).start()
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
        assert len(children) >= 3, children  # the Manager, the async writer and the grader worker
        time.sleep(1.0)  # the worker is inside the endless computation now
        assert set(children) <= set(marked_processes(env))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = wait_gone(env, 30.0)
    assert left == [], f"processes outlived their SIGKILLed parent: {left}"


def _children(pid: int) -> list[int]:
    """Live child pids of `pid` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _started_main(pid: int) -> bool:
    """Whether the rank `pid` is inside `opsd_megatron.cli.train.main`: torch is imported there, after
    `follow_launcher()` (importing the command does not import torch)."""
    try:
        return "libtorch" in (Path("/proc") / str(pid) / "maps").read_text()
    except OSError:
        return False


def test_training_ranks_die_with_a_sigkilled_torchrun(tiny_qwen3_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_qwen3_dir, tmp_path / "run", parallel={"tp": 1})))
    env = {**os.environ, **ENV, **run_marker(), "PYTHONPATH": os.getcwd()}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "opsd_megatron.train", str(cfg)]
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            ranks = _children(agent.pid)
            if len(ranks) == 2 and all(_started_main(p) for p in ranks):
                break
            assert agent.poll() is None, "torchrun exited before its ranks started"
            time.sleep(0.2)
        else:
            raise AssertionError(f"the 2 ranks did not start within 60 s (children: {_children(agent.pid)})")
        agent.send_signal(signal.SIGKILL)  # torchrun's agent dies without signalling its ranks
        agent.wait()
        t0 = time.monotonic()
        while (alive := [p for p in ranks if p in marked_processes(env)]) and time.monotonic() - t0 < 10.0:
            time.sleep(0.2)
        assert alive == [], f"ranks {alive} outlived their SIGKILLed torchrun agent by 10 s"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        wait_gone(env, 0.0)  # leave nothing behind (kills what is left)
