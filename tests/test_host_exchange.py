"""The refresh's same-host shared-memory exchange (rollout/refresh/host_exchange.py) over a real gloo world
of 2 processes: slabs cross through the mapped slots (alternating per bucket), direct writes land in the
other rank's arena, no name is left in /dev/shm once it is open, and a rank that cannot make its segment, or
cannot see the others' (another /dev/shm), turns the exchange off on every rank."""

from __future__ import annotations

import os
import tempfile

import torch
from dist_utils import run_distributed


def _exchange_world(rank: int, world: int, token: str) -> dict:
    import torch.distributed as dist

    from opsd_megatron.rollout.refresh import host_exchange as hx
    from opsd_megatron.rollout.refresh.shard_sync import WorldComm

    dist.init_process_group("gloo")
    comm, peer, slots = WorldComm(), 1 - rank, [5, 7]
    hosts = comm.all_gather_object(hx.host_id())
    ex = hx.HostExchange.open(comm, token, hosts, slots, {0: {"w": 1}}, 3 + rank, torch.float32)
    dist.barrier()  # each rank removes its own name right after the opening barrier
    left_open = sorted(f for f in os.listdir(hx.SHM_DIR) if token in f)
    got, slots_seen, arena_got = [], [], []
    for k in range(3):  # three buckets: slots (and arenas) 0, 1, 0
        out = ex.outbox(slots[rank])
        slots_seen.append(out.data_ptr())
        out.copy_(torch.arange(slots[rank], dtype=torch.float32) + 100 * rank + 10 * k)
        ex.arena(peer)[1:3].fill_(1000 + 100 * rank + k)  # a direct write into the peer's arena
        ex.publish()
        got.append(ex.inbox(peer)[: slots[peer]].clone())
        arena_got.append(ex.arena(rank).clone())
        ex.advance()
    too_big = ""
    try:
        ex.outbox(slots[rank] + 1)
    except ValueError as e:
        too_big = str(e)
    ex._timeout_s = 0.5  # a peer that never reaches the barrier: an error naming the key, not a hang
    stuck = ""
    if rank == 0:
        try:
            ex.publish()
        except RuntimeError as e:
            stuck = str(e)
    dist.barrier()
    split = hx.HostExchange.open(comm, token + "b", ["a", "b"], slots, {}, 0, torch.float32)
    if rank == 1:  # this rank cannot create its segment: every rank must fall back
        hx.SHM_DIR = "/nonexistent-opsd-shm"
    failed = hx.HostExchange.open(comm, token + "c", hosts, slots, {}, 0, torch.float32)
    hx.SHM_DIR = "/dev/shm"
    if rank == 1:  # another /dev/shm (as in another IPC namespace): segments made, but not each other's
        hx.SHM_DIR = tempfile.mkdtemp(prefix="opsd_other_shm_")
    apart = hx.HostExchange.open(comm, token + "d", hosts, slots, {}, 0, torch.float32)
    apart_left = os.listdir(hx.SHM_DIR) if rank == 1 else []
    dist.barrier()
    left_failed = sorted(f for f in os.listdir("/dev/shm") if token in f)
    dist.destroy_process_group()
    return dict(same_host=len(set(hosts)) == 1, opened=ex is not None, left_open=left_open, got=got,
                slots=slots_seen, too_big=too_big, split=split is None, failed=failed is None,
                left_failed=left_failed, arena=arena_got, layouts=ex.layouts, stuck=stuck,
                apart=apart is None, apart_left=apart_left)  # fmt: skip


def hx_barrier_is_flags() -> bool:
    from opsd_megatron.rollout.refresh.host_exchange import TSO

    return TSO  # elsewhere the comm's barrier would hang on the stuck rank: not tried


def test_slabs_cross_through_shared_slots_and_nothing_stays_in_dev_shm():
    token = f"test{os.getpid()}"
    results = run_distributed(_exchange_world, 2, token, timeout=120)
    for rank, r in enumerate(results):
        peer = 1 - rank
        assert r["same_host"] and r["opened"], r
        assert r["left_open"] == [], r["left_open"]  # unlinked once every rank mapped them
        for k, got in enumerate(r["got"]):  # what the peer packed for bucket k, bit-exact
            want = torch.arange([5, 7][peer], dtype=torch.float32) + 100 * peer + 10 * k
            assert torch.equal(got, want), (rank, k, got)
        for k, a in enumerate(r["arena"]):  # this rank's arena (3 + rank long): the peer's direct write
            want = torch.zeros(3 + rank)
            want[1:3] = 1000 + 100 * peer + k
            if k == 2:  # arena 0 again: what bucket 0 left stays outside the written stretch
                want[0] = 0.0
            assert torch.equal(a[:3], want[:3]), (rank, k, a)
        assert r["layouts"] == [{0: {"w": 1}}, {0: {"w": 1}}], r["layouts"]  # every rank's, gathered
        s = r["slots"]
        assert s[0] == s[2] != s[1], s  # buckets alternate between the two slots
        assert "slot holds" in r["too_big"], r["too_big"]
        if hx_barrier_is_flags():
            assert ("ranks [1] did not reach" in r["stuck"] and "parallel.timeout_minutes" in r["stuck"]) == (
                rank == 0
            ), r["stuck"]
        assert r["split"] and r["failed"], r  # other hosts / a rank without a segment: no exchange anywhere
        assert r["left_failed"] == [], r["left_failed"]  # the rank that made its segment removed it
        assert r["apart"] and r["apart_left"] == [], r  # each maps only its own: every rank falls back
