"""Distributed start-up: torch.distributed from torchrun/SLURM env + Megatron parallel_state + seeds.

    from opsd_megatron.mcore import parallel
    ps = parallel.initialize(tp=2, pp=2, seed=1234)   # DP = world_size / (TP * PP)
    ps = parallel.initialize(tp=1, pp=1, ep=2)         # MoE: experts split over 2 ranks of the DP group
    ps = parallel.initialize(tp=1, pp=2, pipeline_layers=[2, 1])   # uneven split (build_model reads it)
    ps.tp_group, ps.pp_group, ps.dp_group, ps.tp_rank, ...
    parallel.destroy()

Backend: nccl with CUDA, gloo without (then `opsd_megatron.mcore.cpu` makes Megatron-core run on CPU). Works
under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), under SLURM `srun` without torchrun
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR from the first host of SLURM_NODELIST or the env),
and as a single plain `python` process (world size 1, a free local port).

Timeout: every group made here (the world, Megatron's TP/PP/DP/EP/... groups, the gloo `cpu_group`) waits
`timeout_minutes` (`parallel.timeout_minutes`) in a collective before raising; groups made elsewhere take
`ParallelState.timeout` (`run.setup.place_engines`). On GPU, NCCL's watchdog then aborts the rank
(TORCH_NCCL_ASYNC_ERROR_HANDLING=1, slurm/common.sh); with gloo the collective raises and
`run.watchdog.ends_job_on_error` names the key in the job's one error line.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mps
from megatron.core import tensor_parallel

from opsd_megatron.config.schema import TIMEOUT_MINUTES
from opsd_megatron.mcore import cpu
from opsd_megatron.mcore.layout import check_pipeline_layers, check_world

log = logging.getLogger(__name__)


@dataclass
class ParallelState:
    """The parallel layout of this process. Groups are `torch.distributed.ProcessGroup`s."""

    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object = field(repr=False)
    pp_group: object = field(repr=False)
    dp_group: object = field(repr=False)
    mp_group: object = field(repr=False)  # TP x PP (model-parallel) group
    backend: str = "gloo"
    pipeline_layers: list[int] | None = None  # decoder layers per stage (None: even split)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 1234
    ep: int = 1  # expert-parallel size (MoE; carved out of DP)
    etp: int = 1  # expert tensor-parallel size (MoE; defaults to TP)
    ep_rank: int = 0
    etp_rank: int = 0
    timeout: timedelta = field(default_factory=lambda: timedelta(minutes=TIMEOUT_MINUTES))
    """Collective timeout of every group (`parallel.timeout_minutes`); pass it to any group made later."""
    cpu_group: object = field(default=None, repr=False)
    """gloo group over the whole world for Python-object collectives (the world group itself on gloo)."""
    cp: int = 1  # context-parallel size: the ranks of one DP replica splitting each sequence (2·CP chunks)
    cp_rank: int = 0
    cp_group: object = field(default=None, repr=False)

    def summary(self) -> str:
        """One short line: `world 8 = TP2 x PP1 x DP4 (EP4), nccl on cuda:0` (the full state is the repr)."""
        ep = f" (EP{self.ep}, ETP{self.etp})" if self.ep > 1 else ""
        ep += f" x CP{self.cp}" if self.cp > 1 else ""
        stages = f", layers per stage {self.pipeline_layers}" if self.pipeline_layers else ""
        return (f"world {self.world_size} = TP{self.tp} x PP{self.pp} x DP{self.dp}{ep}{stages}, "
                f"{self.backend} on {self.device}")  # fmt: skip

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


_STATE: ParallelState | None = None


def _env_int(*names: str, default: int | None = None) -> int | None:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def _first_slurm_host() -> str | None:
    """Address of the job's first node: its name when that resolves, else the NodeAddr SLURM knows it by
    (emulated or unusual clusters whose node names are not host names)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None

    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        name = out.stdout.split()[0]
    except Exception:  # no scontrol: take the text up to the first bracket/comma
        return nodelist.split(",")[0].split("[")[0]
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        info = subprocess.run(
            ["scontrol", "show", "node", "-o", name], capture_output=True, text=True, check=True
        ).stdout
        for field_ in info.split():
            if field_.startswith("NodeAddr="):
                return field_.split("=", 1)[1]
    except Exception:
        pass
    return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_timeout(timeout_minutes: float) -> timedelta:
    """The collective timeout of `parallel.timeout_minutes` (what `ParallelState.timeout` holds); the one
    conversion for groups made outside `initialize` (the separate placement's links and engine worlds)."""
    return timedelta(minutes=timeout_minutes)


def init_world(backend: str | None = None, timeout_minutes: float = TIMEOUT_MINUTES) -> object:
    """torch.distributed.init_process_group from torchrun / SLURM / single-process environment, with
    `timeout_minutes` (a world already up keeps its own); returns a gloo group over the world (the world
    group itself on gloo) for object collectives. Collective."""
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        _init_process_group(backend, timeout)
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timeout)


def _init_process_group(backend: str | None, timeout: timedelta) -> None:
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = (_first_slurm_host() if world > 1 else None) or "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        if world > 1 and "SLURM_JOB_ID" in os.environ:
            os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
        elif world == 1:
            os.environ["MASTER_PORT"] = str(_free_port())
        else:
            raise RuntimeError("MASTER_PORT is not set: launch multi-process runs with torchrun or srun.")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)


def initialize(
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    *,
    backend: str | None = None,
    ep: int = 1,
    etp: int | None = None,
    pipeline_layers: list[int] | None = None,
    timeout_minutes: float = TIMEOUT_MINUTES,
    cp: int = 1,
) -> ParallelState:
    """Initialise torch.distributed (if needed), Megatron's parallel_state for TP x PP (DP derived) and seeds.

    `ep` / `etp`: expert-parallel and expert tensor-parallel sizes for MoE models (etp defaults to tp);
    EP ranks are data-parallel ranks for the dense part. `timeout_minutes` (`parallel.timeout_minutes`) bounds
    every collective of every group made here. `pipeline_layers` (decoder layers per stage, e.g.
    [2, 1]) is kept in the state; `build_model` uses it when not given one. Calling it again with the same
    layout returns the existing state; with a different layout it rebuilds Megatron's groups
    (torch.distributed stays up). `cp`: context-parallel size (`parallel.cp`); DP = world / (TP·PP·CP), the
    CP ranks of one replica share its samples, Megatron's DDP reduces gradients over DP x CP. Collective
    over the world group.
    """
    etp = tp if etp is None else etp
    global _STATE

    check_pipeline_layers(pipeline_layers, pp)  # mcore.layout: the rules declared once
    pl = list(pipeline_layers) if pipeline_layers is not None else None
    same = _STATE is not None and (_STATE.tp, _STATE.pp, _STATE.ep, _STATE.etp, _STATE.cp) == (
        tp,
        pp,
        ep,
        etp,
        cp,
    )
    same = same and _STATE is not None and _STATE.pipeline_layers == pl
    if same and mps.model_parallel_is_initialized():
        return _STATE
    cpu_mode = cpu.install()  # no-op with CUDA
    cpu_group = init_world(backend, timeout_minutes)
    world = dist.get_world_size()
    check_world(world, tp, pp, ep, etp, cp)
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    # With a gloo world every Megatron group is already a gloo group: the extra gloo twins Megatron makes for
    # the distributed optimizer (a CUDA-only feature) would only double the groups and their threads.
    mps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        create_gloo_process_groups=dist.get_backend() != "gloo",
        distributed_timeout_minutes=timeout_minutes,  # type: ignore[arg-type]  (timedelta takes a float)
    )
    tp_rank = mps.get_tensor_model_parallel_rank()
    ep_rank, etp_rank = mps.get_expert_model_parallel_rank(), mps.get_expert_tensor_parallel_rank()
    if cpu_mode:
        cpu.cpu_model_parallel_manual_seed(seed, tp_rank, ep_rank, etp_rank)
        device = torch.device("cpu")
    else:
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        device = torch.device("cuda", torch.cuda.current_device())
    _STATE = ParallelState(
        world_size=world,
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tp=tp,
        pp=pp,
        dp=world // (tp * pp * cp),
        tp_rank=tp_rank,
        pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(),
        tp_group=mps.get_tensor_model_parallel_group(),
        pp_group=mps.get_pipeline_model_parallel_group(),
        dp_group=mps.get_data_parallel_group(),
        mp_group=mps.get_model_parallel_group(),
        backend=dist.get_backend(),
        pipeline_layers=pl,
        device=device,
        seed=seed,
        ep=ep,
        etp=etp,
        ep_rank=ep_rank,
        etp_rank=etp_rank,
        timeout=timedelta(minutes=timeout_minutes),
        cpu_group=cpu_group,
        cp=cp,
        cp_rank=mps.get_context_parallel_rank(),
        cp_group=mps.get_context_parallel_group(),
    )
    if _STATE.rank == 0:
        log.info("parallel layout: %s; collectives time out after %g min (parallel.timeout_minutes)",
                 _STATE.summary(), timeout_minutes)  # fmt: skip
        log.debug("parallel state: %s", _STATE)
    return _STATE


def get_state() -> ParallelState:
    """The state from the last `initialize` call."""
    if _STATE is None:
        raise RuntimeError("opsd_megatron.mcore.parallel.initialize() has not been called in this process.")
    return _STATE


def is_initialized() -> bool:
    return _STATE is not None


def destroy() -> None:
    """Tear down Megatron's parallel_state and the default process group."""
    global _STATE

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = None
