"""A real, throw-away SLURM 22.05 cluster on this machine: two emulated nodes (n1, n2) behind one slurmctld.

Recipe measured in ../shared/docs/slurm_local_cluster.md. Everything lives in a private temp directory: its
own munge key and socket, slurm.conf, state, spool, logs and pid files, and free TCP ports, so it never
touches a system-wide SLURM/munge and several sessions can run side by side. `tests/test_slurm*.py` use it
through a module-scoped fixture that yields from `running_cluster()`:

    cluster = SlurmCluster.start()          # apt-installs SLURM + munge when missing (root only)
    job = cluster.sbatch(["slurm/train.sbatch", "cfg.yaml"], log=tmp / "train.log", env={...})
    state = cluster.wait(job, timeout=120)   # polls `scontrol show job` (faster than `sbatch --wait`)
    cluster.stop()                           # scancel everything, kill daemons and any leftover job process

`SlurmUnavailable` is raised (and turned into a pytest skip by `running_cluster`) only when SLURM cannot be
installed: not root, or no apt-get.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
TRAIN, CONVERT, EVAL = (str(SLURM_DIR / f"{n}.sbatch") for n in ("train", "convert", "eval"))
_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
_BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "munged"]
NODES = ("n1", "n2")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here (not root, or no apt-get)."""


def ensure_installed() -> None:
    """Install slurmctld/slurmd/slurm-client/munge with apt-get when a binary is missing (~5-12 s)."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in _BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root (apt-get)")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and this machine has no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *_PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(_PACKAGES)} failed: {r.stderr.strip()[-300:]}")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """Handle on a running private cluster; `env` is the environment every SLURM client call must use."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pid_files = [root / "munged.pid", root / "slurmctld.pid"] + [
            root / f"slurmd-{n}.pid" for n in NODES
        ]

    # ---------------------------------------------------------------- start / stop
    @classmethod
    def start(cls, timeout: float = 60.0) -> SlurmCluster:
        ensure_installed()
        root = Path(tempfile.mkdtemp(prefix="opsd-slurm-"))
        root.chmod(0o755)  # munged runs as user munge and must reach its socket and key in here
        cluster = cls(root)
        try:
            cluster._start_watchdog()
            cluster._start_munge()
            cluster._write_conf()
            cluster._run([_sbin("slurmctld"), "-c", "-i"])
            for n in NODES:
                (root / "spool" / n).mkdir(parents=True, exist_ok=True)
                cluster._run([_sbin("slurmd"), "-N", n])
            cluster._wait_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_watchdog(self) -> None:
        """A detached process that tears the cluster down if this test process dies without doing it."""
        code = (
            "import os, sys, time; from pathlib import Path\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from slurm_cluster import SlurmCluster\n"
            f"owner, root = {os.getpid()}, Path({str(self.root)!r})\n"
            "while root.exists():\n"
            "    try: os.kill(owner, 0)\n"
            "    except OSError: SlurmCluster(root).stop(); break\n"
            "    time.sleep(2)\n"
        )
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", code], start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
            )
        return r

    def _start_munge(self) -> None:
        m = self.root / "munge"
        m.mkdir()
        key = m / "munge.key"
        src = Path("/etc/munge/munge.key")
        key.write_bytes(src.read_bytes() if src.exists() else os.urandom(128))
        shutil.chown(m, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        m.chmod(0o755)
        key.chmod(0o400)
        self.munge_socket = m / "munge.socket"
        self._run(
            [
                "runuser", "-u", "munge", "--", _sbin("munged"), "--force",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={self.root / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ]
        )  # fmt: skip
        r = subprocess.run(
            f"munge -n -S {self.munge_socket} | unmunge -S {self.munge_socket}",
            shell=True, capture_output=True, text=True,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"munge does not work: {r.stderr.strip()}")

    def _write_conf(self) -> None:
        d = self.root
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        lines = [
            "ClusterName=opsdtest",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=cred_expire=10,socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            # SIGTERM -> SIGKILL grace on cancel/requeue: room for the trainer's preemption checkpoint.
            "KillWait=60",
            "MailProg=/bin/true",
            "MinJobAge=3600",  # keep finished jobs in `scontrol show job` (default: purged after 300 s)
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool' / '%n'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd-%n.log'}",
        ]
        for n, port in zip(NODES, node_ports):
            lines.append(
                f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 RealMemory=1024"
            )
        lines.append(f"PartitionName=debug Nodes=n[1-{len(NODES)}] Default=YES MaxTime=INFINITE State=UP")
        (d / "state").mkdir()
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_idle(self, timeout: float) -> None:
        deadline, out = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=self.env, capture_output=True, text=True)
            out = r.stdout.strip() or r.stderr.strip()
            if out == f"idle {len(NODES)}":
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"SLURM nodes not idle after {timeout:.0f} s (sinfo: {out!r}); logs in {self.root}"
        )

    def _our_leftovers(self) -> list[int]:
        """PIDs of processes that run job code of this cluster (their environment names our slurm.conf)."""
        needle = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if needle in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        """Cancel all jobs, stop slurmd x2 / slurmctld / munged by pid file, kill leftover job processes."""
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env, capture_output=True)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for pf in reversed(self._pid_files):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pf.read_text().split()[0]), signal.SIGTERM)
        time.sleep(0.5)
        for pf in self._pid_files:  # anything still alive after SIGTERM
            try:
                pid = int(pf.read_text().split()[0])
                for _ in range(20):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for pid in self._our_leftovers():  # slurmstepd and job processes are reparented away from slurmd
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is not None:  # it exits by itself once the root is gone; don't leave a zombie
            with contextlib.suppress(subprocess.TimeoutExpired):
                watchdog.wait(timeout=5)

    # ---------------------------------------------------------------- jobs
    def sbatch(
        self,
        argv: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        options: list[str] = (),
        cwd: Path | None = None,
    ) -> int:
        """`sbatch [options] --output=log argv...` with `env` added to the environment; returns the job id."""
        cmd = ["sbatch", "--parsable", f"--output={log}", *options, *argv]
        r = subprocess.run(
            cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, cwd=cwd, timeout=30
        )
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, ...); empty once purged."""
        r = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], env=self.env, capture_output=True, text=True
        )
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait(self, job_id: int, timeout: float, states: set[str] = FINAL_STATES, poll: float = 1.0) -> str:
        """Poll until the job's state is one of `states`; on timeout cancel it and raise TimeoutError."""
        deadline = time.monotonic() + timeout
        state, unknown = "?", 0
        while time.monotonic() < deadline:
            state = self.job_info(job_id).get("JobState", "?")
            if state in states:
                return state
            unknown = unknown + 1 if state == "?" else 0  # one failed scontrol call is not enough
            if unknown >= 15:
                raise RuntimeError(f"job {job_id} is unknown to slurmctld (never submitted, or purged)")
            time.sleep(poll)
        subprocess.run(["scancel", "--full", str(job_id)], env=self.env, capture_output=True)
        raise TimeoutError(
            f"job {job_id} still {state} after {timeout:.0f} s (wanted one of {sorted(states)})"
        )

    def scontrol(self, *args: str) -> str:
        return self._run(["scontrol", *args]).stdout


def job_env(**extra: str) -> dict[str, str]:
    """Environment for the project's sbatch scripts in tests: this interpreter (the .venv) as OPSD_PYTHON."""
    return {"OPSD_PYTHON": sys.executable, **extra}


def running_cluster():
    """Fixture body: a private 2-node cluster (~2 s to start), stopped after; skips if SLURM can't install."""
    try:
        cluster = SlurmCluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no local SLURM cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
