"""The engine links of `rollout.placement: separate` (the two sides live in different torch.distributed
worlds, so both groups are made outside torch.distributed's registry, on the job's rendezvous store).

    layout = SeparateLayout.from_env(engine_ranks=4, engine_tp=2)   # job ranks [0, T) train, [T, N) engines
    link = Link(layout.link_rank, layout.link_size, peers=layout.engine_job_ranks)
    link.broadcast_object(("generate", ...))            # root (trainer rank 0) -> every engine rank
    reply = link.recv_object(src=layout.leader_link_rank(1))   # engine replica 1's rank 0 -> root
    weights = WeightLink(layout.job_rank, layout.job_world)    # every job rank: the shard-exact weight stream

Engine ranks: engine rank i = job rank T + i; replica e = engine ranks [e·tp, (e+1)·tp) (vLLM TP
`rollout.tensor_parallel_size`), each replica its own torch.distributed world (`replica_store`).
`Link` (commands, pickled objects): link rank 0 = the trainers' rank 0, i + 1 = engine rank i; every engine
rank receives every command (the ranks of one replica run vLLM's `external_launcher` in lockstep), only a
replica's rank 0 answers. `WeightLink` (weights): every job rank at its job rank, so the trainers' TP ranks
send their own slices and each engine rank receives only its shard (`rollout.refresh.shard_sync`, one
all-to-all per bucket); NCCL when CUDA is available, else gloo (one log line says which), plus a gloo group
for the one-time plan exchange (Python objects).

The groups are made on the job's rendezvous TCPStore (MASTER_ADDR:MASTER_PORT: torchrun's agent store, or
trainer rank 0's store under plain srun) under the prefixes `opsd/engine_link`, `opsd/weight_link/...` and
`opsd/engine_world/<replica>`. Objects travel pickled: a 1-element int64 length, then the uint8 payload (two
gloo ops). A peer that dies (SIGKILL) breaks its TCP pairs: the blocked op raises at once (or at the link's
timeout) and `EngineLinkError` names the engine's job rank.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from opsd_megatron.mcore.layout import env_rank, env_world_size

JOB_WORLD_ENV = "OPSD_JOB_WORLD_SIZE"
"""The launch's process count, kept here when trainer ranks narrow `WORLD_SIZE` to the trainers."""
JOB_RANK_ENV = "OPSD_JOB_RANK"
"""The launch's rank of an engine rank, kept here when `RANK` becomes the rank inside its replica's world."""

log = logging.getLogger("opsd_megatron")


def job_store(timeout_s: float) -> dist.TCPStore:
    """A client of the job's rendezvous store (MASTER_ADDR:MASTER_PORT)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)  # fmt: skip


class EngineLinkError(RuntimeError):
    """An engine of `rollout.placement: separate` did not answer (died, or the link timed out)."""


@dataclass(frozen=True)
class SeparateLayout:
    """Which job ranks train and which host engines (the engines are the last `engine_ranks` ranks)."""

    job_world: int
    job_rank: int
    engine_ranks: int
    engine_tp: int = 1

    @classmethod
    def from_env(cls, engine_ranks: int, engine_tp: int = 1) -> SeparateLayout:
        """From the launcher's environment (the original count and rank when they were changed here)."""
        world = int(os.environ.get(JOB_WORLD_ENV) or env_world_size())
        return cls(world, int(os.environ.get(JOB_RANK_ENV) or env_rank()), engine_ranks, engine_tp)

    @property
    def trainers(self) -> int:
        return self.job_world - self.engine_ranks

    @property
    def is_engine(self) -> bool:
        return self.job_rank >= self.trainers

    @property
    def engine(self) -> int:
        """This rank's engine-rank index i (engine ranks only; job rank T + i)."""
        return self.job_rank - self.trainers

    @property
    def replica(self) -> int:
        """This engine rank's replica (engine ranks only)."""
        return self.engine // self.engine_tp

    @property
    def replica_rank(self) -> int:
        """This engine rank's rank inside its replica (= its vLLM TP rank)."""
        return self.engine % self.engine_tp

    def leader_link_rank(self, replica: int) -> int:
        """The link rank of replica `replica`'s rank 0 (the one that answers)."""
        return 1 + replica * self.engine_tp

    @property
    def link_rank(self) -> int:
        """0 for trainer rank 0, e + 1 for engine e; -1 for the other trainers (not on the link)."""
        return self.engine + 1 if self.is_engine else (0 if self.job_rank == 0 else -1)

    @property
    def link_size(self) -> int:
        return self.engine_ranks + 1

    @property
    def engine_job_ranks(self) -> list[int]:
        return list(range(self.trainers, self.job_world))


def replica_store(replica: int, timeout_s: float) -> dist.Store:
    """The store of engine replica `replica`'s own torch.distributed world (a prefix of the job's store:
    deterministic from the launch, no port of its own to agree on)."""
    return dist.PrefixStore(f"opsd/engine_world/{replica}", job_store(timeout_s))


class Link:
    """The root-and-engines gloo group (see the module docstring); every op blocks until done."""

    def __init__(self, link_rank: int, size: int, *, peers: list[int], timeout_s: float = 1800.0) -> None:
        store = job_store(timeout_s)
        self.rank, self.size, self.peers = link_rank, size, peers
        self.pg = dist.ProcessGroupGloo(
            dist.PrefixStore("opsd/engine_link", store), link_rank, size, timedelta(seconds=timeout_s)
        )

    def _who(self, link_rank: int | None) -> str:
        if link_rank is None:
            return f"the rollout engines on job ranks {self.peers}"
        if link_rank == 0:
            return "trainer rank 0"
        return f"rollout engine {link_rank - 1} (job rank {self.peers[link_rank - 1]})"

    def _wait(self, work: Any, what: str, peer: int | None) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise EngineLinkError(
                f"{self._who(peer)} did not answer on the engine link ({what}): the process died or timed "
                f"out ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e

    def broadcast_tensor(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Broadcast `t` in place from link rank `root`."""
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self._wait(self.pg.broadcast([t], opts), "broadcast", None if self.rank == 0 else 0)
        return t

    def broadcast_object(self, obj: Any = None) -> Any:
        """Root's `obj` on every link rank (pickled)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if self.rank == 0 else None
        n = self.broadcast_tensor(torch.tensor([0 if data is None else data.numel()], dtype=torch.int64))
        buf = data if data is not None else torch.empty(int(n.item()), dtype=torch.uint8)
        self.broadcast_tensor(buf)
        return obj if self.rank == 0 else pickle.loads(buf.numpy().tobytes())

    def send_object(self, obj: Any, dst: int) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self._wait(self.pg.send([torch.tensor([data.numel()], dtype=torch.int64)], dst, 0), "send", dst)
        self._wait(self.pg.send([data], dst, 1), "send", dst)

    def recv_object(self, src: int) -> Any:
        n = torch.zeros(1, dtype=torch.int64)
        self._wait(self.pg.recv([n], src, 0), "receive", src)
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        self._wait(self.pg.recv([buf], src, 1), "receive", src)
        return pickle.loads(buf.numpy().tobytes())


class WeightLink:
    """Every job rank of a separate launch at its job rank: the comm of the shard-exact weight stream
    (`rollout.refresh.shard_sync.ShardSyncer(comm=...)`). Tensors go over NCCL on CUDA, gloo on CPU; Python
    objects (the plan's one exchange) over a gloo group beside it. Collective construction (all job ranks)."""

    def __init__(self, rank: int, size: int, *, dp_rank: int = -1, peers: list[int] | None = None,
                 timeout_s: float = 1800.0) -> None:  # fmt: skip
        store, timeout = job_store(timeout_s), timedelta(seconds=timeout_s)
        self.rank, self.size, self.dp_rank, self.peers = rank, size, dp_rank, peers or []
        self.timeout_s = timeout_s
        self.objects = dist.ProcessGroupGloo(dist.PrefixStore("opsd/weight_link/gloo", store), rank, size,
                                             timeout)  # fmt: skip
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.tensors = self.objects
        if self.backend == "nccl":  # the (store, rank, size, timeout) constructor, as for gloo above
            self.tensors = dist.ProcessGroupNCCL(dist.PrefixStore("opsd/weight_link/nccl", store), rank, size,
                                                 timeout)  # fmt: skip
        if rank == 0:
            log.info("weight link: %s over %d ranks (%s)", self.backend, size,
                     "CUDA available" if self.backend == "nccl" else "no CUDA")  # fmt: skip

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise EngineLinkError(
                f"the weight link ({what}; {self.size} job ranks, the rollout engines on job ranks "
                f"{self.peers}) broke: a rank died or timed out "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (pickled, over the gloo group), in rank order."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self._wait(self.objects.allgather([sizes], [torch.tensor([data.numel()])]), "plan exchange")
        n = max(int(t.item()) for t in sizes)
        padded = torch.zeros(n, dtype=torch.uint8)
        padded[: data.numel()] = data
        outs = [torch.empty(n, dtype=torch.uint8) for _ in range(self.size)]
        self._wait(self.objects.allgather([outs], [padded]), "plan exchange")
        return [pickle.loads(o[: int(k.item())].numpy().tobytes()) for o, k in zip(outs, sizes)]

    def barrier(self) -> None:
        """Every link rank has arrived (over the gloo group): the refresh's same-host exchange on CPU."""
        self._wait(self.objects.barrier(), "weight bucket barrier")

    def all_to_all_single(self, recv: torch.Tensor, send: torch.Tensor, in_counts: list[int],
                          out_counts: list[int]) -> None:  # fmt: skip
        """`dist.all_to_all_single(recv, send, in_counts, out_counts)` over the link's ranks."""
        self._wait(self.tensors.alltoall_base(recv, send, in_counts, out_counts, dist.AllToAllOptions()),
                   "weight bucket")  # fmt: skip
