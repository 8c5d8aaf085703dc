"""`checkpoint.stop_deadline_s`: a stop signal whose deadline the step in progress would miss abandons that
step at a safe point and saves the last completed one.

Unit: `StopDeadline.would_miss` from a real signal (SIGUSR1 to this process) and given step / save timings.
Run: a real SFT run (Megatron, gloo, one spawned rank, the loop of `run.trainer`) whose step 2 receives
SIGTERM after its backward; with a 2 s deadline and a save timed at 30 s the step cannot end in time: it is
abandoned before the optimizer update; the weights, the optimizer's moments and the LR schedule are step 1's,
the checkpoint of step 1 (not saved before: `save_interval: 0`) is written with reason "signal", and no
step 2 exists anywhere.
"""

from __future__ import annotations

import os
import signal

import torch
from dist_utils import run_distributed
from run_utils import read_state

from opsd_megatron.config import ConfigError, config_from_dict
from opsd_megatron.run.signals import StepAbandoned, StopDeadline, StopSignals


def test_deadline_decision_from_step_and_save_times():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    stop = StopSignals(grace_s=3600.0).install()
    try:
        d = StopDeadline(stop, deadline_s=10.0, world_size=1)
        d.step_started()
        d.safe_point("anywhere")  # no signal: never abandons
        assert not d.would_miss()
        os.kill(os.getpid(), signal.SIGUSR1)  # a real signal through the installed handler
        assert stop.signum == signal.SIGUSR1
        t = stop.first_at
        d._t0, d._steps = t, [0.0, 4.0, 1.0]  # this step began with the signal; the estimate: the longest
        d.save_took(3.0)
        assert not d.would_miss(now=t + 1.0)  # 3 s of step left + 3 s of save: done at t + 7 <= t + 10
        assert not d.would_miss(now=t + 6.5)  # the step is late (estimate spent): 0 left + 3: t + 9.5
        assert d.would_miss(now=t + 7.5)  # t + 10.5
        d.save_took(7.0)
        assert d.would_miss(now=t + 1.0)  # 3 + 7: t + 11
        d2 = StopDeadline(stop, deadline_s=10.0, world_size=1)  # no save timed yet: 2.5 s assumed
        d2._t0, d2._steps = t, [8.0]
        assert d2.would_miss(now=t + 0.5)  # t + 8 + 2.5
        d2.save_took(1.5)
        assert not d2.would_miss(now=t + 0.5)  # t + 8 + 1.5
    finally:
        stop.cancel()
        for s, h in handlers.items():
            signal.signal(s, h)


def test_no_deadline_never_abandons_and_bad_values_name_the_key():
    stop = StopSignals(grace_s=3600.0)
    stop.signum, stop.first_at = signal.SIGTERM, 0.0
    assert not StopDeadline(stop, None, 1).would_miss(now=1e9)
    assert StopDeadline(stop, 5.0, 1).would_miss(now=1e9)
    raised = None
    try:
        StopDeadline(stop, 5.0, 1).safe_point("before the optimizer step")
    except StepAbandoned as e:
        raised = str(e)
    assert raised == "before the optimizer step"
    try:
        config_from_dict({"model": {"path": "m"}, "data": {"path": "d"},
                          "checkpoint": {"stop_deadline_s": 0}})  # fmt: skip
    except ConfigError as e:
        assert "checkpoint.stop_deadline_s" in str(e)
    else:
        raise AssertionError("stop_deadline_s: 0 was accepted")


def _abandon_run(rank, world, cfg: dict):
    from opsd_megatron.run.trainer import make_trainer

    trainer = make_trainer(config_from_dict(cfg))
    st = trainer.state
    seen: dict = {}

    def params():
        return {n: p.detach().clone() for n, p in st.chunks[0].named_parameters()}

    def opt_state():
        inner = getattr(st.optimizer, "optimizer", st.optimizer)
        return {k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)} for k, s in inner.state.items()}

    def on_step_end(tr, step):
        if step == 1:
            seen.update(params=params(), opt=opt_state(), lr_steps=st.scheduler.num_steps)

    trainer.on_step_end = on_step_end
    update = trainer.state.optimizer.step

    def signalled_update():  # never reached for step 2: the safe point before it abandons
        seen["updates"] = seen.get("updates", 0) + 1
        return update()

    st.optimizer.step = signalled_update
    real_safe_point = st.safe_point

    def safe_point(where):
        if trainer.step == 1 and where == "before the optimizer step":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives after step 2's backward
        real_safe_point(where)

    st.safe_point = safe_point
    # A save takes 30 s here (a slow file system): with a 2 s deadline step 2 can only be abandoned.
    trainer.deadline.save_took(30.0)
    try:
        rows = trainer.train()
        after, opt_after = params(), opt_state()
    finally:
        trainer.close()
    same_params = all(torch.equal(after[n], seen["params"][n]) for n in after)
    same_opt = all(torch.equal(opt_after[k][n], seen["opt"][k][n]) for k in opt_after for n in opt_after[k])
    return {"steps": [r["step"] for r in rows], "step": trainer.step, "same_params": same_params,
            "same_opt": same_opt, "lr_steps": (seen["lr_steps"], st.scheduler.num_steps),
            "updates": seen.get("updates", 0)}  # fmt: skip


def test_stop_signal_with_a_short_deadline_abandons_the_step_and_saves_the_last_one(tmp_path):
    from opsd_megatron.demo.synthetic import write_splits
    from opsd_megatron.demo.task_model import make_task_model

    model = make_task_model(tmp_path / "model", hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    paths = write_splits(tmp_path / "task", "addition", n_train=16, n_heldout=4)
    out = tmp_path / "run"
    cfg = {
        "algorithm": "sft",
        "output_dir": str(out),
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"path": str(paths["train"])},
        "prompts": {
            "teacher_template": "Problem: {problem}\nReference:\n{solution}\n",
            "max_prompt_tokens": 128,
        },
        "optimizer": {"lr": 3e-3, "clip_grad": 1.0},
        "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "seed": 0},
        "checkpoint": {"save_interval": 0, "resume": False, "export_hf": False, "stop_deadline_s": 2.0},
        "logging": {"progress_bar": False},
    }
    (r,) = run_distributed(_abandon_run, 1, cfg, timeout=600)
    assert r["steps"] == [1] and r["step"] == 1, r  # step 2 abandoned: no metrics row, the loop ended
    assert r["updates"] == 1, r  # step 1's update only
    assert r["same_params"] and r["same_opt"], r
    assert r["lr_steps"][0] == r["lr_steps"][1], r
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000001"], ckpts
    assert read_state(out / "checkpoints" / "step_000001")["reason"] == "signal"
