"""Same-host exchange of a refresh's slabs through shared memory (CPU): the all-to-all without the copy.

    ex = HostExchange.open(comm, token, hosts, slots, recv_from, dtype)   # collective; None: use gloo
    out = self.outbox(numel)       # this rank's slot for the bucket: pack the slabs for other ranks here
    self.publish()                 # one barrier: every rank's slabs of this bucket are written
    self.inbox(src)[lo:hi]         # read what `src` packed for this rank, straight into the targets
    self.advance()                 # next bucket (the other slot)

Why: on CPU the refresh's ranks usually share one host, where gloo's all-to-all goes through loopback TCP
(measured 30-50 ms for 49.5 MiB, 3.5-5 plain copies of the same bytes). Here every rank packs into its own
slot of a shared-memory segment and its receivers copy out of it after one barrier: the bytes move once
(pack) plus once (unpack), which the gloo path does too, with no transport in between and no receive buffer.

Layout: rank r owns one segment of two slots of `slots[r]` elements (the most it sends in one bucket);
bucket k (counted over the refresh's remote buckets, on every rank alike) uses slot k % 2. A writer reuses a
slot two buckets later, after the next bucket's barrier, which every reader enters only once it has copied
out of that slot: one barrier per bucket is enough.

Life cycle, crash-safe: each rank creates `/dev/shm/opsd-refresh-<token>-<rank>` with its size reserved
(`posix_fallocate`: a full tmpfs fails here, cleanly, not with SIGBUS on a later write), every rank maps the
segments of the ranks it receives from, and after a barrier each rank unlinks its own name: from then on
the memory lives only in the mappings, so a killed run leaves nothing in /dev/shm. Opening is collective
(one `all_gather_object` + one barrier); when any rank cannot create its segment every rank falls back to
the comm's all-to-all (logged once, with the reason).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

import torch

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


def host_id() -> str:
    """This machine's identity for "same host": hostname and kernel boot id (containers on one host that
    share /dev/shm report the same boot id; distinct hosts never do)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


class HostExchange:
    """The shared-memory slots of one refresh stream (module doc). Build with `open`."""

    def __init__(self, comm: Any, mine: torch.Tensor, peers: dict[int, torch.Tensor], slots: list[int]):
        self.comm = comm
        self._mine = mine
        self._peers = peers
        self._slots = slots
        self._k = 0

    @classmethod
    def open(
        cls, comm: Any, token: str, hosts: list[str], slots: list[int], recv_from: set[int],
        dtype: torch.dtype,
    ) -> HostExchange | None:  # fmt: skip
        """Collective over `comm`: the exchange, or None when the ranks span hosts (no collective then: every
        rank sees the same `hosts`), a segment cannot be made, or CUDA is in use (NCCL moves the bytes
        there). `token` (the same on every rank) names this stream's segments; `slots[r]`: the most
        elements rank r sends in one bucket (the same list on every rank); `recv_from`: the ranks this one
        reads from."""
        if torch.cuda.is_available() or len(set(hosts)) != 1:
            if len(set(hosts)) != 1 and comm.rank == 0:
                log.info("weight refresh: ranks on %d hosts, slabs move by the all-to-all", len(set(hosts)))
            return None
        itemsize = torch.empty((), dtype=dtype).element_size()
        slots = [max(int(n), 1) for n in slots]
        path = _path(token, comm.rank)
        nbytes = 2 * slots[comm.rank] * itemsize
        error = ""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
        except OSError as e:
            error = f"{path}: {e.strerror or e} ({nbytes / 2**20:.1f} MiB)"
        errors = [e for e in comm.all_gather_object(error) if e]
        if errors:
            _unlink(path)
            if comm.rank == 0:
                log.warning("weight refresh: no shared-memory exchange (%s); slabs move by the all-to-all",
                            errors[0])  # fmt: skip
            return None
        try:
            mine = _map(path, 2 * slots[comm.rank], dtype)
            peers = {src: _map(_path(token, src), 2 * slots[src], dtype) for src in sorted(recv_from)}
        finally:
            comm.barrier()  # every rank has mapped what it needs (or failed): the names can go
            _unlink(path)
        if comm.rank == 0:
            log.info("weight refresh: same-host shared-memory exchange (%d ranks, rank 0 %.1f MiB)",
                     comm.size, nbytes / 2**20)  # fmt: skip
        return cls(comm, mine, peers, slots)

    def _slot(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        n, s = self._slots[rank], self._k % 2
        return t[s * n : (s + 1) * n]

    def outbox(self, numel: int) -> torch.Tensor:
        """This rank's slot of the current bucket, flat, `numel` elements (≤ the planned send size)."""
        me = self.comm.rank
        if numel > self._slots[me]:
            raise ValueError(f"refresh exchange: {numel} elements to send, the slot holds {self._slots[me]}")
        return self._slot(self._mine, me)[:numel]

    def publish(self) -> None:
        """Barrier: every rank has packed the current bucket into its slot."""
        self.comm.barrier()

    def inbox(self, src: int) -> torch.Tensor:
        """Rank `src`'s slot of the current bucket, flat (read-only by convention)."""
        return self._slot(self._peers[src], src)

    def advance(self) -> None:
        """The next bucket uses the other slot."""
        self._k += 1

    def move(self, bucket: Any, sends: list, recvs: list, src_view, dst_view, stats: Any, tick,
             since: float) -> float:  # fmt: skip
        """The remote part of one refresh bucket (`ShardSyncer`): pack this rank's slabs (`sends`, by
        destination: the all-to-all's send order) into its slot, one barrier, copy each sender's slabs for
        this rank (`recvs`, by source) out of that sender's slot. `src_view(tr)` / `dst_view(tr)`: a
        transfer's slabs; `tick(phase, since)` records a phase's seconds and returns now; `stats`: the
        refresh's RefreshStats. Returns the last tick."""
        me = self.comm.rank
        send = self.outbox(sum(tr.numel for tr in sends))
        stats.materialised_bytes += send.numel() * send.element_size()
        o = 0
        for tr in sends:
            src = src_view(tr)
            send[o : o + tr.numel].view(src.shape).copy_(src)
            o += tr.numel
        since = tick("pack_s", since)
        self.publish()
        stats.collectives += 1
        stats.sent_bytes += send.numel() * send.element_size()
        since = tick("collective_s", since)
        at: dict[int, int] = {}  # where this rank's slabs start in each sender's slot
        for tr in bucket.transfers:
            if tr.src != tr.dst and tr.dst < me:
                at[tr.src] = at.get(tr.src, 0) + tr.numel
        for tr in recvs:
            o = at.get(tr.src, 0)
            dst = dst_view(tr)
            dst.copy_(self.inbox(tr.src)[o : o + tr.numel].view(dst.shape))
            at[tr.src] = o + tr.numel
        self.advance()
        return tick("unpack_s", since)


def _map(path: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """`numel` elements of the file at `path`, mapped shared (writes are seen by every mapping)."""
    return torch.from_file(path, shared=True, size=numel, dtype=dtype)


def _path(token: str, rank: int) -> str:
    return os.path.join(SHM_DIR, f"opsd-refresh-{token}-{rank}")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
