"""The one training loop on Megatron-core: a step strategy (`cfg.algorithm`: OPSD or SFT) run step after step,
with weight refresh, metrics, checkpoints, stop signals, rollout log, periodic evaluation and HF export.

    trainer = make_trainer(cfg)    # after torchrun/srun started the processes; builds everything (run.setup)
    trainer.train()                # steps, metrics, checkpoints, signals, final HF export
    trainer.close()

Placement. Every rank holds its Megatron shard (TP×PP, DP = world / (TP×PP)) and its part of one in-process
rollout engine with its own tensor parallelism `rollout.tensor_parallel_size` (`opsd_megatron.rollout.
placement`); the step's rollouts are gathered over the world and each data-parallel replica packs its slice
(`opsd_megatron.rollout.collect`). After each optimizer step each engine rank receives exactly its shard of
the new weights from the ranks that hold them (`opsd_megatron.rollout.refresh`, shard-exact with vLLM).

One step (all ranks; `train_step`):
1. samples: the strategy's `samples` (OPSD: rollouts with per-request seeds, so a resumed run samples what
   the uninterrupted one did; SFT: reference solutions).
   With `rollout.offload_train_state` (GPU) gradients and optimizer state wait in host memory meanwhile
   (`opsd_megatron.step.offload`).
2. with `rollout.sleep_between_rollouts` the engine sleeps (memory for teacher, student, optimizer);
3. the strategy's `train`: pack, teacher forward, student forward + backward, optimizer and schedule step,
   teacher update (`opsd_megatron.step.opsd`, `opsd_megatron.step.sft`);
4. the CUDA cache is emptied, the engine wakes and its weights are refreshed (steps with an engine only);
5. metrics (router losses for MoE; the drift guard), save (before evaluating: an evaluation that fails or is
   cut must not cost the step), periodic evaluation, rollouts.jsonl, stop signals.
An exception on any rank ends every rank within seconds (`opsd_megatron.run.watchdog`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from opsd_megatron.config import OPSDConfig
from opsd_megatron.evaluation.hook import periodic_eval
from opsd_megatron.mcore.conversion import save_hf_checkpoint
from opsd_megatron.mcore.lora import save_peft_adapter
from opsd_megatron.mcore.models.moe import router_loss_metrics
from opsd_megatron.observe.metrics import MetricsLogger
from opsd_megatron.observe.rollout_log import RolloutLog, record, token_divergences
from opsd_megatron.rollout.base import Sample
from opsd_megatron.rollout.engine_group import serve, spreading
from opsd_megatron.rollout.refresh.drift import DriftGuard
from opsd_megatron.rollout.remote import RemoteCollector
from opsd_megatron.run.checkpointing import abandon_saves, mark_reason, poll_saves, save_checkpoint
from opsd_megatron.run.engine_server import EngineServer
from opsd_megatron.run.preflight import record_config
from opsd_megatron.run.separate import is_engine_rank
from opsd_megatron.run.setup import build_state, resume
from opsd_megatron.run.signals import StepAbandoned, StopDeadline, StopSignals, any_rank_stopped
from opsd_megatron.run.watchdog import ends_job_on_error
from opsd_megatron.step.offload import TrainStateOffload, free_cached_memory
from opsd_megatron.step.opsd import OPSDStep
from opsd_megatron.step.optim import current_lr
from opsd_megatron.step.sft import SFTStep

log = logging.getLogger("opsd_megatron")

STEPS = {"opsd": OPSDStep, "sft": SFTStep}
"""`algorithm` (config) -> the step strategy (`opsd_megatron.step.protocol.Step`)."""


class Trainer:
    """Owns the run's state (`run.setup.RunState`), the step strategy, metrics, rollout log and stop signals.

    `on_step_end(trainer, step)` is called after each step's metrics are logged (tests use it)."""

    @ends_job_on_error
    def __init__(self, cfg: OPSDConfig, *, on_step_end: Callable[[Trainer, int], None] | None = None):
        step_cls = STEPS[cfg.algorithm]
        self.cfg, self.on_step_end = cfg, on_step_end
        st = build_state(cfg, needs_engine=step_cls.needs_engine, make_teacher=step_cls.make_teacher)
        self.state = st
        self.strategy = step_cls(st)
        offload = cfg.rollout.offload_train_state and step_cls.needs_engine
        self.offload = TrainStateOffload(st.chunks, st.optimizer, enabled=offload)  # around generation
        resumed = resume(st)
        self.step = resumed or 0
        if resumed is not None:
            self.refresh()  # the engine started from the HF weights; give it the resumed ones
        self.start_step = self.step
        # SIGTERM/SIGUSR1/SIGINT: finish the step (or abandon it: checkpoint.stop_deadline_s), save, exit; a
        # second Ctrl-C exits at once.
        c = cfg.checkpoint
        self.stop_signals = StopSignals(c.exit_signal_grace_s, st.ps.rank).install()
        self.deadline = StopDeadline(self.stop_signals, c.stop_deadline_s, st.ps.world_size)
        st.safe_point = self.deadline.safe_point if c.stop_deadline_s is not None else None
        self.saved: tuple[int, Path | None] | None = (self.step, None) if resumed is not None else None
        if st.ps.rank == 0:
            record_config(cfg, st.out)  # config.yaml + config_history/NNN_<time>.yaml
        self.metrics = MetricsLogger(st.out, cfg.logging, total_steps=cfg.train.steps, start_step=self.step,
                                     run_config=cfg.to_dict(), rank=st.ps.rank)  # fmt: skip
        self.rollout_log = RolloutLog(st.out, cfg.logging.rollout_interval, cfg.logging.rollout_samples,
                                      rank=st.ps.rank, start_step=self.step)  # fmt: skip

    @property
    def stop_signal(self) -> int | None:
        """The first stop signal received (None while running)."""
        return self.stop_signals.signum

    @ends_job_on_error
    def train(self) -> list[dict]:
        """Run from `self.step` to `train.steps`; returns the metric rows of this call."""
        cfg, rows = self.cfg, []
        while self.step < cfg.train.steps:
            try:
                m, samples, divergences = self.train_step()
            except StepAbandoned:  # weights, optimizer, schedule: those of the last completed step
                self._save_abandoned()
                return rows
            stop = any_rank_stopped(self.stop_signals, self.state.ps.world_size)
            # Save before evaluating: an evaluation that fails or is cut must not cost the step.
            saved = self._save_step(stop)
            if saved is not None:
                m["checkpoint/saved"] = 1.0  # observe.metrics: "| checkpoint saved" on the step line
            due = cfg.eval.interval and self.step % cfg.eval.interval == 0
            if not stop and self.strategy.needs_engine and due:
                m.update(self.evaluate())
            self.metrics.log(self.step, m)
            if self.strategy.needs_engine:
                self._log_rollouts(samples, divergences)
            rows.append({"step": self.step, **m})
            if self.on_step_end is not None:
                self.on_step_end(self, self.step)
            if self._stopping_now(stop, saved):
                return rows
        if cfg.checkpoint.export_hf:
            self.export_hf(self.state.out / "hf")
        return rows

    def train_step(self) -> tuple[dict[str, float], list[Sample], list | None]:
        """One step: samples -> (sleep) -> train -> (wake -> refresh) -> metrics; returns (the step's global
        metrics, this replica's samples, the captured per-token divergences or None). Collective."""
        cfg, st, engine = self.cfg, self.state, self.strategy.needs_engine
        sleep = engine and cfg.rollout.sleep_between_rollouts
        t0 = time.perf_counter()
        self.deadline.step_started()
        with self.offload.during_generation():  # rollout.offload_train_state
            samples, stats = self.strategy.samples(self.step)
        t1 = time.perf_counter()
        if sleep:  # free the engine's memory for teacher, student, optimizer
            st.engine.sleep()
        out = self.strategy.train(samples, capture=engine and self.rollout_log.due(self.step + 1))
        if sleep:  # the refresh writes into the engine's weights
            free_cached_memory()  # the training step's cached blocks, for the engine's weights and KV cache
            st.engine.wake_up()
        refresh = self.refresh()
        self.step += 1
        m = self.strategy.metrics(stats, out)
        m.update(lr=current_lr(st.optimizer), epoch=st.sampler.epoch_of(self.step - 1))
        if engine:
            m.update({"time/rollout_s": t1 - t0, **out.timings, **refresh})
            m.update(getattr(st.collector, "step_metrics", {}))  # placement=separate: staleness, waits
        if st.info.spec.is_moe:  # router losses of this step (collective over PP / DP)
            n_mb = cfg.train.global_batch_size // (cfg.train.micro_batch_size * st.dp)
            m.update(router_loss_metrics(st.info.spec.num_layers, n_mb))
        if engine and cfg.rollout.drift_threshold is not None and not m.get("rollout/staleness"):
            DriftGuard(cfg.rollout.drift_threshold, "drift/median_abs_logprob").check(m, step=self.step)
        m["time/step_s"] = time.perf_counter() - t0
        self.deadline.step_finished()
        m["throughput/response_tokens_per_s"] = m["response_tokens"] / m["time/step_s"]
        return m, samples, out.divergences

    def refresh(self) -> dict[str, float]:
        """Push the current (LoRA-merged) weights into the rollout engines ({} without one). Collective."""
        st = self.state
        if st.syncer is None:
            return {}
        t0 = time.perf_counter()
        stats = st.syncer.sync(st.chunks, st.engine)
        out = {"time/refresh_s": time.perf_counter() - t0}
        out.update({k: v for k, v in stats.metrics("refresh/").items() if k in ("refresh/bytes",)})
        return out

    def _save_step(self, stop: bool) -> Path | None:
        """Checkpoint the step just done (interval, final, or a stop signal) and the periodic HF export;
        returns the checkpoint written, if any. Collective."""
        cfg, saved = self.cfg, None
        poll_saves()  # an async save whose writers finished becomes complete (opsd_state.json, latest)
        every = cfg.checkpoint.save_interval
        if stop or (every and self.step % every == 0) or self.step == cfg.train.steps:
            saved = self.save("signal" if stop else "final" if self.step == cfg.train.steps else "interval")
        every_hf = cfg.checkpoint.export_hf_interval
        if not stop and every_hf and self.step % every_hf == 0:
            self.export_hf(self.state.out / f"hf_step_{self.step:06d}")
        return saved

    def _stopping_now(self, stop: bool, saved: Path | None) -> bool:
        """True when a stop signal (seen before the save, or since) ends the loop after this step; a
        checkpoint of this step then exists. Collective unless `stop` is already set."""
        if not (stop or any_rank_stopped(self.stop_signals, self.state.ps.world_size)):
            return False
        if saved is None:
            self.save("signal")
        elif not stop:  # the signal came after this step's save: that checkpoint is where it stopped
            mark_reason(saved, "signal")
        self.stop_signals.cancel()
        return True

    def _save_abandoned(self) -> None:
        """After `StepAbandoned`: the last completed step's checkpoint (saved now unless it already is),
        marked as the signal's stop. Collective."""
        if self.saved is not None and self.saved[0] == self.step:
            if self.saved[1] is not None:
                mark_reason(self.saved[1], "signal")
        else:
            self.save("signal")
        self.stop_signals.cancel()

    def _log_rollouts(self, samples: list[Sample], divergences: list | None) -> None:
        """A few of rank 0's rollouts of this step to rollouts.jsonl (every logging.rollout_interval)."""
        if not self.rollout_log.due(self.step):
            return
        st = self.state
        k = min(self.cfg.logging.rollout_samples, len(samples))
        idx = st.sampler.replica_slice(self.step - 1, st.ps.dp_rank, st.dp)[:k]
        divs: list = [None] * k
        if divergences:
            mbs = self.cfg.train.micro_batch_size
            counts = [min(mbs, len(samples) - j * mbs) for j in range(len(divergences))]
            divs = token_divergences([d for d, _ in divergences], [m for _, m in divergences], counts)
        responses = [samples[i].response for i in range(k)]
        correct = st.collector.grade(list(idx), responses)
        recs = [
            record(st.problems[j].row, st.problems[j].problem,
                   st.tokenizer.decode(r, skip_special_tokens=True), len(r), samples[i].truncated,
                   correct[i], divs[i] if i < len(divs) else None)
            for i, (j, r) in enumerate(zip(idx, responses))
        ]  # fmt: skip
        self.rollout_log.write(self.step, recs)

    def evaluate(self) -> dict[str, float]:
        """Periodic evaluation (`eval.*`) of the refreshed weights on every engine: rank 0 runs the
        evaluation and writes its files, each `generate` call is split over all engines
        (`rollout.engine_group`); returns `eval/...` metrics on rank 0 ({} elsewhere). Collective."""
        st, out = self.state, {}
        run = partial(periodic_eval, tokenizer=st.tokenizer, eval_cfg=self.cfg.eval, step=self.step,
                      output_dir=st.out)  # fmt: skip
        if isinstance(st.collector, RemoteCollector):  # placement=separate: over the engine link
            return st.collector.evaluate(self.step, run)
        if st.ps.rank == 0:
            with spreading(st.engine, st.placement, st.ps.cpu_group) as engine:
                out = run(engine)
        else:
            serve(st.engine, st.placement, st.ps.cpu_group)
        return out

    def save(self, reason: str) -> Path:
        """Checkpoint of the current step (model, optimizer, scheduler, teacher, RNG, config). Collective.
        Interval saves are written in the background with `checkpoint.async_save`; final and signal saves
        return complete. With placement=separate the batch in flight is saved with it."""
        st, t0 = self.state, time.perf_counter()
        if isinstance(st.collector, RemoteCollector):
            st.collector.before_save(self.step)
        is_async = self.cfg.checkpoint.async_save and reason == "interval"
        path = save_checkpoint(st.ckpt_root, self.step, st.chunks, st.optimizer, st.scheduler,
                               teacher=st.teacher, reason=reason, config=self.cfg.to_dict(),
                               async_save=is_async)  # fmt: skip
        self.deadline.save_took(time.perf_counter() - t0)
        self.saved = (self.step, path)
        return path

    def export_hf(self, out_dir: Path) -> None:
        """Write an HF checkpoint (LoRA merged) loadable by `transformers` and, with LoRA, the PEFT adapter
        to `<out_dir>/../adapter`; collective."""
        st, cfg = self.state, self.cfg
        save_hf_checkpoint(st.chunks, out_dir, tokenizer_dir=cfg.model.tokenizer or cfg.model.path,
                           shard_hook=st.shard_hook)  # fmt: skip
        if st.ps.rank == 0:
            log.info("exported HF checkpoint to %s", out_dir)
        if cfg.lora.enabled and cfg.lora.export_peft:  # for peft.PeftModel.from_pretrained
            save_peft_adapter(
                st.chunks, Path(out_dir).parent / "adapter", cfg.lora, base_model=cfg.model.path
            )

    def close(self) -> None:
        """Stop the watchdog, flush the metrics, shut the engine down."""
        st = self.state
        abandon_saves()  # only an error leaves an async save in flight here: it stays incomplete
        if st.watchdog is not None:
            st.watchdog.stop()
        self.metrics.close()
        if isinstance(st.collector, RemoteCollector):
            st.collector.close()  # the engines leave their loop
        if st.engine is not None:
            st.engine.close()
            st.engine = None


def make_trainer(cfg: OPSDConfig, **kwargs) -> Trainer | EngineServer:
    """The trainer for `cfg` (its step strategy chosen by `cfg.algorithm`); kwargs go to `Trainer`. On the
    engine ranks of `rollout.placement: separate`, the engine's server loop (`run.engine_server`)."""
    return EngineServer(cfg) if is_engine_rank(cfg) else Trainer(cfg, **kwargs)
