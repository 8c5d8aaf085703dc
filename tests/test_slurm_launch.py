"""The sbatch scripts' launch logic on a real local SLURM cluster (2 emulated nodes, tests/slurm_cluster.py).

* bad submissions (no/missing config, nodes x processes not a multiple of TP x PP, an unknown config key, a
  bad convert subcommand, eval without --model, two container kinds at once) fail within seconds with one
  clear line;
* container options end up on the srun line (dry run: no pyxis/Apptainer here);
* train.sbatch on 2 nodes x 1 process, with tests/slurm_probe.py standing in for the trainer: a gloo
  all-reduce across the two "nodes" (whose names do not resolve: NodeAddr fallback), USR1 to the batch shell
  (what `--signal=B:USR1@N` does) forwarded to both ranks, which "save" and exit, the job requeued by the
  shell, and the restart run with `checkpoint.resume=true`.

Run: .venv/bin/python -m pytest tests/test_slurm_launch.py -q
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import CONVERT, EVAL, TRAIN, job_env

pytestmark = pytest.mark.slurm


CONFIG = """\
output_dir: {out}
model: {{path: {out}/no-model}}
data: {{path: {out}/no-data.jsonl}}
parallel: {{tp: {tp}, pp: 1}}
train: {{global_batch_size: 4, micro_batch_size: 1, steps: 3}}
"""


def _config(tmp_path: Path, tp: int = 2) -> Path:
    p = tmp_path / f"cfg_tp{tp}.yaml"
    p.write_text(CONFIG.format(out=tmp_path / "run", tp=tp))
    return p


def _wait_for(path: Path, needle: str, count: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.count(needle) >= count:
            return text
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} not seen {count}x in {path} after {timeout:.0f} s:\n{text[-3000:]}")


def test_bad_submissions_fail_fast(slurm_cluster, tmp_path):
    cfg2 = _config(tmp_path, tp=2)
    cfg4 = _config(tmp_path, tp=4)
    cases = {  # name: (sbatch argv, extra env, expected line in the job log)
        "missing_config": (["-N1", TRAIN, str(tmp_path / "nope.yaml")], {}, "error: config file"),
        "no_config": (["-N1", TRAIN], {}, "error: no config: pass CONFIG.yaml as the first argument"),
        "world_mismatch": (
            ["-N2", TRAIN, str(cfg4)],
            {"PROCS_PER_NODE": "1"},
            "error: 2 node(s) x 1 process(es) per node = 2 processes, which is not a multiple of "
            "parallel.tp x parallel.pp = 4 x 1 = 4",
        ),
        "unknown_key": (["-N1", TRAIN, str(cfg2), "train.stepz=3"], {}, "train.stepz"),
        "two_containers": (
            ["-N1", TRAIN, str(cfg2)],
            {"OPSD_CONTAINER_IMAGE": "a.sqsh", "OPSD_APPTAINER_IMAGE": "b.sif"},
            "error: set only one of OPSD_CONTAINER_IMAGE",
        ),
        "convert_subcommand": ([CONVERT, "hf2meg", "--hf", "x"], {}, "error: first argument must be one of"),
        "convert_missing_hf": (
            [CONVERT, "hf-to-megatron", "--hf", str(tmp_path / "nohf"), "--out", "o"],
            {},
            "--hf",
        ),
        "eval_no_bench": (
            [EVAL, "--model", "m", "--benchmark", str(tmp_path / "b.jsonl")],
            {},
            "--benchmark file",
        ),
        "eval_no_model": ([EVAL, "--n", "1"], {}, "error: --model PATH is required"),
    }
    t0 = time.monotonic()
    jobs = {
        name: slurm_cluster.sbatch(argv, log=tmp_path / f"{name}.log", env=job_env(**env), cwd=tmp_path)
        for name, (argv, env, _) in cases.items()
    }
    for name, job in jobs.items():
        state = slurm_cluster.wait(job, timeout=60, poll=0.3)
        log = (tmp_path / f"{name}.log").read_text()
        assert state == "FAILED", f"{name}: job ended {state}, log:\n{log}"
        assert cases[name][2] in log, f"{name}: expected {cases[name][2]!r} in the job log:\n{log}"
        assert slurm_cluster.job_info(job).get("ExitCode") == "2:0", name
        assert len(log.strip().splitlines()) <= 2, f"{name}: expected a short message, got:\n{log}"
    assert time.monotonic() - t0 < 60, "bad submissions should fail within seconds, not hang"
    # the world-size message comes from the config check, which names the config key for unknown keys
    assert "unknown" in (tmp_path / "unknown_key.log").read_text().lower()


def test_container_options_reach_srun(slurm_cluster, tmp_path):
    cfg = _config(tmp_path, tp=1)
    pyxis = {
        "OPSD_CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.01-py3",
        "OPSD_CONTAINER_MOUNTS": "/data:/data",
    }
    apptainer = {"OPSD_APPTAINER_IMAGE": "/images/opsd.sif"}
    jobs = {
        name: slurm_cluster.sbatch(
            ["-N1", TRAIN, str(cfg)],
            log=tmp_path / f"{name}.log",
            env=job_env(OPSD_DRY_RUN="1", **env),
            cwd=tmp_path,
        )
        for name, env in [("pyxis", pyxis), ("apptainer", apptainer)]
    }
    for name, job in jobs.items():
        assert slurm_cluster.wait(job, timeout=60, poll=0.3) == "COMPLETED", (
            tmp_path / f"{name}.log"
        ).read_text()
    pyxis_log = (tmp_path / "pyxis.log").read_text()
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3 --container-mounts=/data:/data" in pyxis_log
    assert "apptainer exec --bind" in (tmp_path / "apptainer.log").read_text()
    assert "/images/opsd.sif bash -c" in (tmp_path / "apptainer.log").read_text()


def test_two_nodes_rendezvous_usr1_requeue_resume(slurm_cluster, tmp_path):
    cfg = _config(tmp_path, tp=2)
    log = tmp_path / "probe.log"
    env = job_env(
        OPSD_TRAIN_ENTRY="slurm_probe:main",
        PYTHONPATH=str(Path(__file__).parent),
        PROBE_SECONDS="120",
        PROBE_GRACE="3",
        PROCS_PER_NODE="1",
    )
    job = slurm_cluster.sbatch(["-N2", TRAIN, str(cfg), "train.steps=3"], log=log, env=env, cwd=tmp_path)
    text = _wait_for(log, "probe rank=", 2, timeout=90)
    for rank, node in [
        (0, "n1"),
        (1, "n2"),
    ]:  # both ranks, one per emulated node, all-reduce over the "nodes"
        assert f"probe rank={rank} world=2 local_rank=0 node={node} sum=3 restart=0" in text, text
    assert "rendezvous 127.0.0.1:" in text  # n1 does not resolve: the NodeAddr fallback was used
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=slurm_cluster.env, check=True)
    text = _wait_for(log, "restart=1", 2, timeout=90)
    for rank in (0, 1):
        assert (
            f"probe rank={rank} got SIGUSR1" in text and f"probe rank={rank} saved after SIGUSR1" in text
        ), text
    assert "requeueing job" in text
    assert slurm_cluster.wait(job, timeout=90, poll=0.5) == "COMPLETED", log.read_text()
    text = log.read_text()
    second = text[text.index("restart 1:") :]
    assert "checkpoint.resume=true" in second
    assert second.count("'checkpoint.resume=true']") == 2 and second.count("done") >= 2, second
    assert slurm_cluster.job_info(job).get("Restarts") == "1"
