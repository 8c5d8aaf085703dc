"""Packing: contiguous prompt ‖ response, explicit one-token shift in both sequences, masks, end padding."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.step.batch import Sample, gather_positions, pack_for_step, pack_microbatch, pack_step

PAD = 0


def _samples():
    return [
        Sample([11, 12, 13], [21, 22, 23, 24, 25], [31, 32, 99], [-0.1, -0.2, -0.3]),  # ends with EOS 99
        Sample([14], [26, 27], [33, 34, 35, 36, 37], truncated=True),  # truncated: no EOS, all kept
        Sample([15, 16], [28], [38]),
    ]


def test_shift_mapping_and_masks():
    samples = _samples()
    mb = pack_microbatch(samples, pad_id=PAD, student_len=12, teacher_len=12)
    assert mb.student_tokens.shape == (3, 12) and mb.response_ids.shape == (3, 5)
    assert mb.loss_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert mb.num_tokens == 9
    for i, x in enumerate(samples):
        s, t = mb.student_tokens[i].tolist(), mb.teacher_tokens[i].tolist()
        n = len(x.response)
        # contiguous: prompt then response, padding only at the end
        assert s[: len(x.student_prompt) + n] == x.student_prompt + x.response and set(
            s[len(x.student_prompt) + n :]
        ) <= {PAD}
        assert t[: len(x.teacher_prompt) + n] == x.teacher_prompt + x.response and set(
            t[len(x.teacher_prompt) + n :]
        ) <= {PAD}
        for j in range(n):  # position index[j] predicts response[j] in BOTH sequences
            assert s[mb.student_index[i, j] + 1] == x.response[j] == t[mb.teacher_index[i, j] + 1]
            assert mb.response_ids[i, j] == x.response[j]
        assert mb.student_index[i].max() < 12 and mb.teacher_index[i].max() < 12
    assert torch.allclose(mb.rollout_logprobs[0, :3], torch.tensor([-0.1, -0.2, -0.3]))
    assert mb.student_position_ids[2].tolist() == list(range(12))


def test_gather_positions_matches_loop():
    mb = pack_microbatch(_samples(), pad_id=PAD)
    logits = torch.randn(3, mb.student_tokens.shape[1], 7)
    g = gather_positions(logits, mb.student_index)
    for i in range(3):
        for j in range(g.shape[1]):
            assert torch.equal(g[i, j], logits[i, mb.student_index[i, j]])


def test_pack_step_uses_one_length_for_all_microbatches():
    samples = _samples() + [Sample([1] * 20, [2] * 30, [3] * 4)]
    mbs = pack_step(samples, micro_batch_size=2, pad_id=PAD, pad_to_multiple=8)
    assert len(mbs) == 2
    assert {m.student_tokens.shape[1] for m in mbs} == {24} and {m.teacher_tokens.shape[1] for m in mbs} == {
        40
    }
    assert sum(m.num_tokens for m in mbs) == 13
    with pytest.raises(ValueError, match="not divisible by micro_batch_size=2"):
        pack_step(samples[:3], micro_batch_size=2, pad_id=PAD)
    with pytest.raises(ValueError, match="shorter than the longest"):
        pack_microbatch(samples, pad_id=PAD, student_len=4)


def test_pack_for_step_rounds_to_a_multiple_of_tp_under_sequence_parallelism():
    samples = _samples() + [Sample([1] * 20, [2] * 30, [3] * 4)]  # longest: student 24, teacher 34
    mbs = pack_for_step(samples, micro_batch_size=2, pad_id=PAD, pad_to_multiple=8, tp=3)
    assert {m.student_tokens.shape[1] for m in mbs} == {24} and {m.teacher_tokens.shape[1] for m in mbs} == {
        40
    }
    mbs = pack_for_step(
        samples, micro_batch_size=2, pad_id=PAD, pad_to_multiple=8, tp=3, sequence_parallel=True
    )
    assert {m.student_tokens.shape[1] for m in mbs} == {24} and {m.teacher_tokens.shape[1] for m in mbs} == {
        48
    }


def test_group_by_length_pads_each_micro_batch_to_its_own_longest_and_keeps_the_sample_order():
    from opsd_megatron.step.batch import in_sample_order, length_order, padding_fraction

    samples = [Sample([1] * 3, [2] * 5, [3] * n) for n in (2, 40, 3, 38, 1, 5)]
    plain = pack_step(samples, micro_batch_size=2, pad_id=PAD, pad_to_multiple=8)
    grouped = pack_step(samples, micro_batch_size=2, pad_id=PAD, pad_to_multiple=8, group_by_length=True)
    assert length_order(samples) == [1, 3, 5, 2, 0, 4]
    assert [m.sample_ids for m in grouped] == [[1, 3], [5, 2], [0, 4]]
    assert [m.student_tokens.shape[1] for m in grouped] == [48, 8, 8]  # 43, 8, 6 rounded up to 8
    assert {m.student_tokens.shape[1] for m in plain} == {48}
    assert sum(m.num_tokens for m in grouped) == sum(m.num_tokens for m in plain) == 89
    pad_plain, pad_grouped = padding_fraction(plain), padding_fraction(grouped)
    assert pad_plain[0] / pad_plain[1] > 0.5 > pad_grouped[0] / pad_grouped[1]
    real = sum(2 * len(x.response) + 8 for x in samples)
    assert pad_grouped[1] - pad_grouped[0] == real  # unpadded student + teacher positions
    # per-token rows back in the step's order, regrouped by micro_batch_size (rollouts.jsonl)
    rows = [(m.response_ids.float(), m.loss_mask) for m in grouped]
    back = in_sample_order(rows, grouped, 2)
    for k, (d, mask) in enumerate(back):
        for i in range(2):
            n = len(samples[2 * k + i].response)
            assert d[i, :n].tolist() == [3.0] * n and mask[i].sum() == n


def test_context_parallel_index_math_equals_a_plain_gather():
    """Megatron's load-balanced 2xCP split (its own get_batch_on_this_cp_rank, a world-1 gloo group standing
    in for each CP rank's group) and the response-position gathers: summed over ranks = the plain gather."""
    import inspect
    import tempfile

    import torch.distributed as dist
    from megatron.core.utils import get_batch_on_this_cp_rank

    # megatron-core 0.19's version (new required is_hybrid_cp) reads the CP group through torch.distributed, a
    # registered group of cp ranks that one process cannot stand in for: Megatron's split is the reference on
    # 0.16 only; the plain-gather checks below run on both
    megatron_ref = "is_hybrid_cp" not in inspect.signature(get_batch_on_this_cp_rank).parameters

    from opsd_megatron.step.context_parallel import cp_local_index, cp_positions, gather_held, split_for_cp

    g = torch.Generator().manual_seed(0)
    b, S, h = 3, 48, 5
    hidden = torch.randn(b, S, h, generator=g, requires_grad=True)
    index = torch.randint(0, S, (b, 7), generator=g)
    tokens = torch.randint(0, 100, (b, S), generator=g)
    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(tempfile.mktemp(prefix="opsd_cp_"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    class RankOf:  # only .size() and .rank() are read by Megatron's split
        def __init__(self, size, rank):
            self.size, self.rank = (lambda: size), (lambda: rank)

    try:
        for cp in (1, 2, 3, 4):
            held_count = torch.zeros(b, 7, dtype=torch.long)
            total = torch.zeros(b, 7, h)
            for r in range(cp):
                mine = split_for_cp(tokens, cp, r)
                if megatron_ref:
                    ref = get_batch_on_this_cp_rank({"tokens": tokens.clone()}, cp_group=RankOf(cp, r))
                    assert torch.equal(mine, ref["tokens"]), (cp, r)
                local, held = cp_local_index(index, seq_len=S, cp=cp, rank=r)
                pos = cp_positions(S, cp, r)
                assert torch.equal(pos[local][held], index[held])  # local -> global is the identity on held
                total = total + gather_held(split_for_cp(hidden, cp, r), local, held)
                held_count += held.long()
            assert torch.equal(held_count, torch.ones_like(held_count))  # every position held exactly once
            assert torch.equal(total, gather_positions(hidden, index)), cp
    finally:
        if created:
            dist.destroy_process_group()
    with pytest.raises(ValueError, match="multiple of 2 x context-parallel size 4"):
        cp_positions(20, 4, 0)


def test_parallel_cp_refusals_are_one_config_error_naming_the_key():
    """cp > 1 is accepted (the local spec's all-gather CP attention or TE's); refused: with pp > 1 (the config
    check and the builder), with a mixture-of-experts model (the builder), and cp < 1."""
    from opsd_megatron.config import ConfigError, config_from_dict
    from opsd_megatron.mcore.models.builder import check_context_parallel

    check_context_parallel(1, pp=2, is_moe=True)
    check_context_parallel(2)
    for kw, what in ((dict(pp=2), "with parallel.pp 2"), (dict(is_moe=True), "mixture-of-experts")):
        with pytest.raises(ConfigError, match="config key 'parallel.cp': 2 ") as e:
            check_context_parallel(2, **kw)
        assert what in str(e.value) and "\n" not in str(e.value)
    base = {"model": {"path": "m"}, "data": {"path": "d"}}
    config_from_dict({**base, "parallel": {"cp": 2}})
    with pytest.raises(ConfigError, match="config key 'parallel.cp': 2 with parallel.pp 2"):
        config_from_dict({**base, "parallel": {"cp": 2, "pp": 2}})
    with pytest.raises(ConfigError, match="config key 'parallel.cp': 2 is supported by algorithm=opsd only"):
        config_from_dict({**base, "algorithm": "sft", "parallel": {"cp": 2}})
    with pytest.raises(ConfigError, match="parallel.cp"):
        config_from_dict({**base, "parallel": {"cp": 0}})
    from opsd_megatron.mcore.layout import LayoutError, check_world

    assert check_world(8, 2, 1, cp=2) == 2  # DP = world / (TP x PP x CP)
    with pytest.raises(LayoutError, match="'parallel.cp': 4 x parallel.tp x parallel.pp = 4 does not divide"):
        check_world(6, 1, 1, cp=4)
