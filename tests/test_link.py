"""The separate placement's links on CPU (real gloo groups on a real TCPStore, no model): the layout of job
ranks into trainers, engine ranks and replicas, and the `WeightLink` ops the shard-exact stream uses (the
object exchange of the plan and an all-to-all where some ranks send or receive nothing)."""

from __future__ import annotations

import torch
from dist_utils import run_distributed

from opsd_megatron.rollout.link import SeparateLayout


def test_layout_of_two_tp2_replicas():
    """Launch of 7: ranks 0-2 train, engine ranks 3-6 form replicas {3, 4} and {5, 6}."""
    lays = [SeparateLayout(7, r, engine_ranks=4, engine_tp=2) for r in range(7)]
    assert [lay.is_engine for lay in lays] == [False] * 3 + [True] * 4
    assert [(lay.replica, lay.replica_rank) for lay in lays[3:]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [lay.link_rank for lay in lays] == [0, -1, -1, 1, 2, 3, 4]
    assert [lays[0].leader_link_rank(e) for e in (0, 1)] == [1, 3]  # the replicas' rank 0 answer
    assert lays[0].engine_job_ranks == [3, 4, 5, 6] and lays[0].link_size == 5


def _weight_link_ops(rank, world):
    import os

    import torch.distributed as dist

    from opsd_megatron.rollout.link import WeightLink

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, world, True, wait_for_workers=False) if rank == 0 else None
    link = WeightLink(rank, world, timeout_s=60)
    seen = link.all_gather_object({"rank": rank, "pad": "x" * 100 * rank})  # unequal pickled sizes
    # rank 0 (a trainer) sends 2 values to each engine rank, rank 1 sends 1 to rank 2; engines send nothing
    send = {0: torch.arange(4.0), 1: torch.tensor([7.0])}.get(rank, torch.empty(0))
    out_counts = {0: [0, 0, 2, 2], 1: [0, 0, 1, 0]}.get(rank, [0, 0, 0, 0])
    in_counts = {2: [2, 1, 0, 0], 3: [2, 0, 0, 0]}.get(rank, [0, 0, 0, 0])
    recv = torch.empty(sum(in_counts))
    link.all_to_all_single(recv, send, in_counts, out_counts)
    del store
    return seen, recv, link.backend


def test_weight_link_gathers_objects_and_streams_uneven_all_to_all():
    res = run_distributed(_weight_link_ops, 4, timeout=300)
    for seen, _, backend in res:
        assert backend == "gloo"  # no CUDA here
        assert seen == [{"rank": r, "pad": "x" * 100 * r} for r in range(4)]
    assert [r[1].tolist() for r in res] == [[], [], [0.0, 1.0, 7.0], [2.0, 3.0]]
