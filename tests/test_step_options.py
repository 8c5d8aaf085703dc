"""Step options at start-up and in packing: loss.* config errors naming the key; loss.skip_first_tokens on
the tiny tokenizer's real prompts (the teacher prompt ends where thinking is on, the student's where it is
off; the first k response positions leave the loss and its token count)."""

from __future__ import annotations

import pytest

from opsd_megatron.config import ConfigError, config_from_dict
from opsd_megatron.data.prompts import render_pair
from opsd_megatron.step.batch import Sample, pack_step, skip_first_tokens

BASE = {"model": {"path": "m"}, "data": {"path": "d"}, "rollout": {"max_new_tokens": 16}}


def _cfg(loss=None, parallel=None):
    return config_from_dict({**BASE, "loss": loss or {}, "parallel": parallel or {}})


@pytest.mark.parametrize(
    "loss,parallel,key",
    [({"kind": "top_k"}, None, "loss.top_k"), ({"kind": "top_k", "top_k": 0}, None, "loss.top_k"),
     ({"kind": "forward_kl", "top_k": 5}, None, "loss.top_k"), ({"kind": "topk"}, None, "loss.kind"),
     ({"skip_first_tokens": 16}, None, "loss.skip_first_tokens"),
     ({"skip_first_tokens": -1}, None, "loss.skip_first_tokens"),
     ({"chunk_tokens": 0}, None, "loss.chunk_tokens"),
     (None, {"tp": 1, "sequence_parallel": True}, "parallel.sequence_parallel")],
)  # fmt: skip
def test_loss_config_errors_name_the_key(loss, parallel, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        _cfg(loss, parallel)


def test_every_loss_kind_is_selectable():
    from opsd_megatron.step.opsd import LossSpec

    for loss, want in [({"kind": "forward_kl"}, "forward_kl"), ({"kind": "reverse_kl"}, "reverse_kl"),
                       ({"kind": "jsd", "beta": 0.5}, "jsd"), ({"kind": "top_k", "top_k": 8}, "top_k"),
                       ({"kind": "top_k", "top_k": 8, "top_k_tail": False}, "top_k_renorm"),
                       ({"kind": "sampled_token"}, "sampled_token")]:  # fmt: skip
        spec = LossSpec.from_config(_cfg(loss), vocab_size=10, tp_group=None, sampling=None)
        assert spec.kind == want and spec.temperature == 1.1
        assert spec.clip == (0.05 if want == "forward_kl" else None), want  # the clip is forward KL's recipe
        assert spec.beta == loss.get("beta", 0.0)
    spec = LossSpec.from_config(
        _cfg({"kind": "top_k", "top_k": 8, "top_k_tail": False, "beta": 0.5}),
        vocab_size=10,
        tp_group=None,
        sampling=None,
    )  # the reference's top-k script
    assert (spec.kind, spec.beta, spec.clip) == ("top_k_renorm", 0.5, None)


def test_skip_first_tokens_on_tiny_prompts(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    s, t = render_pair(tok, "What is 2 + 3?", "2 + 3 = 5, so \\boxed{5}.")
    assert tok.decode(s).endswith("</think>\n\n") and not tok.decode(t).endswith("</think>\n\n")
    resp = [
        tok.encode("The answer is 5.", add_special_tokens=False),
        tok.encode("5", add_special_tokens=False),
    ]
    samples = [Sample(s, t, r) for r in resp]
    mbs = pack_step(samples, micro_batch_size=2, pad_id=0)
    full = mbs[0].loss_mask.clone()
    assert mbs[0].num_tokens == len(resp[0]) + len(resp[1])
    skip_first_tokens(mbs, 2)
    mb = mbs[0]
    assert mb.loss_mask[:, :2].sum() == 0
    assert mb.loss_mask[:, 2:].equal(full[:, 2:])  # later positions untouched
    assert mb.num_tokens == max(len(resp[0]) - 2, 0) + max(len(resp[1]) - 2, 0)
    # position 0 of the response is predicted from the last prompt token of each sequence
    assert mb.student_index[0, 0] == len(s) - 1 and mb.teacher_index[0, 0] == len(t) - 1
