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
