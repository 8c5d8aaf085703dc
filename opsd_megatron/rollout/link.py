"""The engine link of `rollout.placement: separate`: trainer rank 0 and the engine ranks in one gloo group of
their own, outside torch.distributed's registry (the two sides live in different torch.distributed worlds).

    layout = SeparateLayout.from_env(engine_ranks=2)     # job ranks [0, T) train, [T, N) host engines
    link = Link(layout.link_rank, layout.link_size, peers=layout.engine_job_ranks)
    link.broadcast_object(("generate", ...))            # root (trainer rank 0) -> every engine
    reply = link.recv_object(src=1)                     # engine 1 of the link (job rank T) -> root
    link.broadcast_tensor(flat)                         # weight buckets

Link ranks: 0 = the trainers' rank 0, e + 1 = engine e (job rank T + e). The group is a `ProcessGroupGloo`
made on the job's rendezvous TCPStore (MASTER_ADDR:MASTER_PORT: torchrun's agent store, or trainer rank 0's
store under plain srun) under the prefix `opsd/engine_link`. Objects travel pickled: a 1-element int64 length,
then the uint8 payload (two gloo ops). A peer that dies (SIGKILL) breaks its TCP pairs: the blocked op raises
at once (or at the link's timeout) and `EngineLinkError` names the engine's job rank.
"""

from __future__ import annotations

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


class EngineLinkError(RuntimeError):
    """An engine of `rollout.placement: separate` did not answer (died, or the link timed out)."""


@dataclass(frozen=True)
class SeparateLayout:
    """Which job ranks train and which host engines (the engines are the last `engine_ranks` ranks)."""

    job_world: int
    job_rank: int
    engine_ranks: int

    @classmethod
    def from_env(cls, engine_ranks: int) -> SeparateLayout:
        """From the launcher's environment (the original process count when the world was narrowed)."""
        world = int(os.environ.get(JOB_WORLD_ENV) or env_world_size())
        return cls(world, env_rank(), engine_ranks)

    @property
    def trainers(self) -> int:
        return self.job_world - self.engine_ranks

    @property
    def is_engine(self) -> bool:
        return self.job_rank >= self.trainers

    @property
    def engine(self) -> int:
        """This rank's engine index (engine ranks only)."""
        return self.job_rank - self.trainers

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


class Link:
    """The root-and-engines gloo group (see the module docstring); every op blocks until done."""

    def __init__(self, link_rank: int, size: int, *, peers: list[int], timeout_s: float = 1800.0) -> None:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)  # fmt: skip
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
