"""The OPSD training loop on Megatron-core; steps: rollout, teacher_forward, train_step, sync_weights.

    trainer = OPSDTrainer(cfg)     # after torchrun/srun started the processes; initialises everything
    trainer.train()                # steps, metrics, checkpoints, signals, final HF export
    trainer.close()

Placement. Every rank holds its Megatron shard (TP×PP, DP = world / (TP×PP)) and one in-process rollout
engine with the full model (vLLM creates its process groups collectively over the trainer's world, so every
rank must build one; the colocated layout of NeMo-RL/verl with engine TP = 1). A data-parallel replica's
prompts are split over the ranks of its model-parallel group: each rank samples its contiguous share and the
responses (token ids, logprobs, finish reasons, rollout correctness) are all-gathered over the model-parallel
group (`all_gather_object`), so every rank of the replica packs the same micro-batches. Prompts are rendered
on every rank (cheap, deterministic). After each optimizer step every rank pushes the exported full weights
(`export_hf_weights` yields every tensor on every rank) into its own engine.

One step (all ranks):
1. rollout: the replica's problems for this step (a pure function of (seed, step)), student prompts →
   engine.generate with a per-step seed (so a resumed run samples exactly what the uninterrupted one did).
2. pack: student = student prompt ‖ response, teacher = teacher prompt ‖ response, padded at the end to one
   fixed length per forward_backward call (pipeline p2p needs fixed shapes); see `opsd_megatron.batch`.
3. teacher_forward: Megatron's forward-only schedule over the teacher chunks (`opsd_megatron.teacher`); on the
   last stage the vocab-parallel logits at response positions are kept, [b, R, v/tp] per micro-batch.
4. train_step: Megatron's forward_backward_func over the student chunks; the loss function (last stage)
   gathers the student's logits at the same response positions and calls `vocab_parallel_divergence`. The
   loss is normalised by the GLOBAL number of response tokens G (all micro-batches, all DP replicas):
   each micro-batch returns sum_loss · DP · M / G, Megatron divides by M, DDP averages over DP → Σ/G.
   Then finalize_model_grads (DP all-reduce, tied-embedding sync), Megatron optimizer step with grad-norm
   clipping, OptimizerParamScheduler step, teacher.after_optimizer_step (EMA).
5. sync_weights: stream the (LoRA-merged) HF-named weights into the engines (`opsd_megatron.weight_sync`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opsd_megatron.batch import MicroBatch, Sample, gather_positions, pack_step
from opsd_megatron.config import ConfigError, OPSDConfig, save_config, validate_model, validate_world

log = logging.getLogger("opsd_megatron")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SUM_KEYS = ("loss_sum", "tokens", "divergence", "clipped_fraction", "student_entropy", "teacher_entropy",
             "drift_abs", "drift_mult")  # fmt: skip
"""Per-micro-batch sums returned by the loss function (last stage), reduced over micro-batches and DP."""
# Per-step sampling seed: a pure function of (train.seed, step, dp_rank).
_SEED_STRIDE = (1_000_003, 7_919)


def step_seed(seed: int, step: int, rollout_rank: int) -> int:
    """Sampling seed of one rollout rank at one step: a pure function, so resumed runs sample identically."""
    return (seed * _SEED_STRIDE[0] + step * _SEED_STRIDE[1] + rollout_rank * 104_729) % (2**31 - 1)


class OPSDTrainer:
    """Owns the model chunks, teacher, optimizer, scheduler, rollout engine, metrics and checkpoints."""

    def __init__(self, cfg: OPSDConfig, *, on_step_end: Callable[[OPSDTrainer, int], None] | None = None):
        from opsd_megatron import parallel

        self.cfg = cfg
        self.on_step_end = on_step_end
        self.ps = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
        self.dp = validate_world(cfg, self.ps.world_size)
        validate_model(cfg)
        self.dtype = _DTYPES[cfg.model.dtype]
        if self.dtype != torch.float32 and not torch.cuda.is_available():
            raise ConfigError(
                f"config key 'model.dtype': {cfg.model.dtype} needs CUDA (Megatron's mixed-precision "
                "optimizer); use float32 on CPU."
            )
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.mp_rank = dist.get_rank(self.ps.mp_group) if self.ps.world_size > 1 else 0
        self.step = 0
        self._signal: int | None = None
        self._grace_timer: threading.Timer | None = None
        self._setup_data()
        self._setup_model()
        self._setup_engine()
        self._maybe_resume()
        self._install_signal_handlers()
        from opsd_megatron.metrics import MetricsLogger

        if self.ps.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.metrics = MetricsLogger(
            self.out, cfg.logging, total_steps=cfg.train.steps, start_step=self.step,
            run_config=cfg.to_dict(), rank=self.ps.rank,
        )  # fmt: skip

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
        if self.data_stats["skipped"] and self.ps.rank == 0:
            log.warning("skipped %d bad rows of %s", self.data_stats["skipped"], self.data_stats["source"])
        self.sampler = PromptSampler(len(self.problems), cfg.train.global_batch_size, cfg.train.seed,
                                     cfg.data.shuffle)  # fmt: skip
        self._prompt_cache: dict[int, tuple[list[int], list[int]]] = {}

    def _build_chunks(self, *, initialize: bool) -> list:
        from opsd_megatron.conversion import load_hf_weights
        from opsd_megatron.models import build_model

        chunks = build_model(self.cfg.model.path, self.dtype, perform_initialization=False)
        if initialize:
            load_hf_weights(chunks, self.cfg.model.path)
        return chunks

    def _setup_model(self) -> None:
        from opsd_megatron.models import model_info
        from opsd_megatron.schedule import build_optimizer, build_scheduler, install_schedule_hooks, wrap_ddp
        from opsd_megatron.teacher import make_teacher

        cfg = self.cfg
        chunks = self._build_chunks(initialize=True)
        self.info = model_info(chunks)
        if cfg.lora.enabled:
            from opsd_megatron.lora import apply_lora

            apply_lora(chunks, cfg.lora)
        # The teacher is created from the initial weights (θ₀), before any checkpoint is loaded.
        self.teacher = make_teacher(
            cfg.teacher.mode, chunks, lambda: self._build_chunks(initialize=False),
            ema_decay=cfg.teacher.ema_decay, offload=cfg.teacher.offload,
        )  # fmt: skip
        self.chunks = wrap_ddp(chunks)
        self.optimizer = build_optimizer(cfg.optimizer, self.chunks, self.dtype)
        self.scheduler = build_scheduler(cfg.optimizer, self.optimizer, cfg.train.steps)
        install_schedule_hooks(self.chunks, self.optimizer)

    def _setup_engine(self) -> None:
        from opsd_megatron.rollout import make_engine

        r = self.cfg.rollout
        self.engine = make_engine(
            r.engine,
            self.cfg.model.path,
            dtype=self.cfg.model.dtype,
            seed=self.cfg.train.seed,
            gpu_memory_utilization=r.gpu_memory_utilization,
            enable_sleep_mode=r.sleep_between_rollouts,
            max_model_len=self.cfg.prompts.max_prompt_tokens + r.max_new_tokens,
        )

    def _maybe_resume(self) -> None:
        from opsd_megatron.checkpointing import latest_checkpoint, load_checkpoint

        c = self.cfg.checkpoint
        path = Path(c.load) if c.load else (latest_checkpoint(self.ckpt_root) if c.resume else None)
        if path is None:
            return
        self.step = load_checkpoint(path, self.chunks, self.optimizer, self.scheduler, teacher=self.teacher)
        if self.ps.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)
        self.sync_weights()  # the engine started from the HF weights; give it the resumed ones

    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            if self._signal is None:
                self._signal = signum
                grace = self.cfg.checkpoint.exit_signal_grace_s
                log.warning("rank %d: signal %d, saving after this step (grace %.0f s)", self.ps.rank, signum,
                            grace)  # fmt: skip
                # If the save cannot finish in time, leave rather than be killed mid-write later.
                self._grace_timer = threading.Timer(grace, lambda: os._exit(128 + signum))
                self._grace_timer.daemon = True
                self._grace_timer.start()

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(s, handler)

    # ---------------------------------------------------------------- rollout
    def _prompts(self, idx: int) -> tuple[list[int], list[int]]:
        from opsd_megatron.prompts import render_pair

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
        """Sample this replica's responses for `step` (0-based); share them over the model-parallel group."""
        idx = self.sampler.replica_slice(step, self.ps.dp_rank, self.dp)
        prompts = [self._prompts(i) for i in idx]
        # This rank's contiguous share of the replica's prompts (its engine samples them).
        mp, mp_rank = self.ps.tp * self.ps.pp, self.mp_rank
        lo, hi = len(idx) * mp_rank // mp, len(idx) * (mp_rank + 1) // mp
        rows: list = []
        correct: list = []
        if hi > lo:
            seed = step_seed(self.cfg.train.seed, step, self.ps.dp_rank * mp + mp_rank)
            self.engine.wake_up()
            outs = self.engine.generate([s for s, _ in prompts[lo:hi]], self._sampling_cfg(seed))
            rows = [(o[0].token_ids, o[0].logprobs, o[0].finish_reason) for o in outs]
            correct = self._grade(idx[lo:hi], [row[0] for row in rows])
        if mp > 1:
            gathered: list[Any] = [None] * mp
            dist.all_gather_object(gathered, (rows, correct), group=self.ps.mp_group)
            rows = [r for g in gathered for r in g[0]]
            correct = [c for g in gathered for c in g[1]]
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
        """Teacher logits at response positions: [b, R, v/tp] per micro-batch (None off the last stage)."""

        def step_fn(data_iterator, model):
            mb = next(data_iterator)
            out = model(mb.teacher_tokens, mb.teacher_position_ids, None)

            def keep(output):  # [b, T, v/tp] on the last stage
                sel = gather_positions(output, mb.teacher_index)  # [b, R, v/tp]
                return output.new_zeros(()), {"teacher_logits": sel}

            return out, keep

        dev = self.ps.device
        with self.teacher.forward_context() as chunks:
            store = self._forward_backward(
                step_fn, [m.to(dev) for m in mbs], chunks, mbs[0].teacher_tokens.shape[1], forward_only=True
            )
        if not self.ps.is_last_stage:
            return [None] * len(mbs)
        return [d["teacher_logits"] for d in store]

    def _loss_func(self, mb: MicroBatch, teacher_logits: torch.Tensor, scale: float, output: torch.Tensor):
        from opsd_megatron.losses import divergence_metrics, vocab_parallel_divergence
        from opsd_megatron.weight_sync.drift import vocab_parallel_token_logprobs

        lc = self.cfg.loss
        kw = dict(
            kind=lc.kind, beta=lc.beta, temperature=lc.temperature or self.cfg.rollout.temperature,
            clip=lc.clip, loss_mask=mb.loss_mask, tp_group=self.ps.tp_group, vocab_size=self.info.vocab_size,
        )  # fmt: skip
        student = gather_positions(output, mb.student_index)  # [b, R, v/tp]
        per_pos = vocab_parallel_divergence(student, teacher_logits, **kw)  # [b, R], 0 where masked
        loss_sum = per_pos.sum()
        with torch.no_grad():
            m = divergence_metrics(student.detach(), teacher_logits, **kw)
            n = float(mb.num_tokens)
            sums = {"loss_sum": loss_sum.detach().double(), "tokens": torch.tensor(n, dtype=torch.float64)}
            for k in ("divergence", "clipped_fraction", "student_entropy", "teacher_entropy"):
                sums[k] = m[k].double() * n
            # Drift: the engine sampled with exactly these weights; compare its logprobs with ours.
            lp = vocab_parallel_token_logprobs(
                student.detach(),
                mb.response_ids,
                self._sampling_cfg(None),
                vocab_size=self.info.vocab_size,
                tp_group=self.ps.tp_group,
            )
            delta = (mb.rollout_logprobs.double() - lp.double()).abs().clamp(
                max=30.0
            ) * mb.loss_mask  # [b, R]
            sums["drift_abs"] = delta.sum()
            sums["drift_mult"] = (torch.expm1(delta) * mb.loss_mask).sum()
        return loss_sum * scale, sums

    def forward_backward_step(self, mbs: list[MicroBatch], teacher_logits: list, global_tokens: int) -> dict:
        """Student forward+backward over all micro-batches; returns this rank's metric sums."""
        scale = self.dp * len(mbs) / max(global_tokens, 1)

        def step_fn(data_iterator, model):
            mb, t_logits = next(data_iterator)
            out = model(mb.student_tokens, mb.student_position_ids, None)
            return out, partial(self._loss_func, mb, t_logits, scale)

        dev = self.ps.device
        data = [(m.to(dev), t) for m, t in zip(mbs, teacher_logits)]
        store = self._forward_backward(step_fn, data, self.chunks, mbs[0].student_tokens.shape[1], False)
        keys = _SUM_KEYS
        sums = dict.fromkeys(keys, 0.0)
        for d in store if self.ps.is_last_stage else []:
            for k in keys:
                sums[k] += float(d[k])
        return sums

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """Teacher forward, student forward+backward, optimizer and schedule step on one replica's samples."""
        t0 = time.perf_counter()
        mbs = pack_step(samples, micro_batch_size=self.cfg.train.micro_batch_size, pad_id=self.pad_id,
                        pad_to_multiple=self.cfg.train.pad_to_multiple)  # fmt: skip
        local = torch.tensor([sum(m.num_tokens for m in mbs)], dtype=torch.long)
        if self.dp > 1:
            dist.all_reduce(local, group=self.ps.dp_group)
        global_tokens = int(local.item())
        teacher_logits = self.teacher_forward(mbs)
        t1 = time.perf_counter()
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = self.forward_backward_step(mbs, teacher_logits, global_tokens)
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
        from opsd_megatron.weight_sync.buckets import WeightSyncer

        if not hasattr(self, "_syncer"):
            self._syncer = WeightSyncer(
                self.engine, bucket_bytes=int(self.cfg.rollout.bucket_mb * 2**20), dtype=self.dtype,
                export_kwargs={"shard_hook": self._shard_hook()},
            )  # fmt: skip
        t0 = time.perf_counter()
        stats = self._syncer.sync(self.chunks)
        if self.engine is not None and self.cfg.rollout.sleep_between_rollouts:
            self.engine.sleep()
        out = {"time/refresh_s": time.perf_counter() - t0}
        out.update({k: v for k, v in stats.metrics("refresh/").items() if k in ("refresh/bytes",)})
        return out

    # ------------------------------------------------------------------- loop
    def _global_metrics(self, rollout_stats: dict, step_out: dict) -> dict[str, float]:
        from opsd_megatron.metrics import reduce_sums

        tp, pp = self.ps.tp, self.ps.pp
        s = step_out["sums"]
        vec = {k: s[k] / tp for k in _SUM_KEYS}
        acc = rollout_stats["rollout/accuracy"]
        vec["acc_sum"] = 0.0 if acc != acc else acc / (tp * pp)
        vec["acc_n"] = 0.0 if acc != acc else 1.0 / (tp * pp)
        for k in ("rollout/response_length", "rollout/truncation_rate"):
            vec[k] = rollout_stats[k] / (tp * pp * self.dp)
        g = reduce_sums(vec)
        n = max(g["tokens"], 1.0)
        return {
            "loss": g["loss_sum"] / n,
            "divergence": g["divergence"] / n,
            "clipped_fraction": g["clipped_fraction"] / n,
            "entropy/student": g["student_entropy"] / n,
            "entropy/teacher": g["teacher_entropy"] / n,
            "response_tokens": g["tokens"],
            "rollout/accuracy": g["acc_sum"] / g["acc_n"] if g["acc_n"] > 0 else float("nan"),
            "rollout/response_length": g["rollout/response_length"],
            "rollout/truncation_rate": g["rollout/truncation_rate"],
            "drift/mean_abs_logprob": g["drift_abs"] / n,
            "drift/mult_prob_err": g["drift_mult"] / n,
        }

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1 if self._signal is not None else 0], dtype=torch.int32)
        if self.ps.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> list[dict]:
        """Run from `self.step` to `train.steps`; returns the metric rows of this call."""
        from opsd_megatron.schedule import current_lr

        rows = []
        cfg = self.cfg
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            samples, rstats = self.rollout(self.step)
            t1 = time.perf_counter()
            out = self.train_step(samples)
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
            if cfg.rollout.drift_threshold is not None:
                from opsd_megatron.weight_sync.drift import DriftGuard

                DriftGuard(cfg.rollout.drift_threshold, "drift/mean_abs_logprob").check(m, step=self.step)
            m["time/step_s"] = time.perf_counter() - t0
            m["throughput/response_tokens_per_s"] = m["response_tokens"] / m["time/step_s"]
            if cfg.eval.interval and self.step % cfg.eval.interval == 0:
                m.update(self.evaluate())
            self.metrics.log(self.step, m)
            rows.append({"step": self.step, **m})
            if self.on_step_end is not None:
                self.on_step_end(self, self.step)
            if self._stop_requested():
                self.save("signal")
                if self._grace_timer is not None:
                    self._grace_timer.cancel()
                return rows
            every = cfg.checkpoint.save_interval
            if every and self.step % every == 0 and self.step < cfg.train.steps:
                self.save("interval")
        self.save("final")
        if cfg.checkpoint.export_hf:
            self.export_hf(self.out / "hf")
        return rows

    def evaluate(self) -> dict[str, float]:
        """Periodic evaluation (`eval.*`) of the refreshed weights on global rank 0's engine; every replica
        holds the same weights, so the other ranks only wait. Returns `eval/...` metrics on rank 0."""
        out: dict[str, float] = {}
        if self.ps.rank == 0:
            from opsd_megatron.evaluation.hook import periodic_eval

            out = periodic_eval(self.engine, self.tokenizer, self.cfg.eval, self.step, self.out)
        if self.ps.world_size > 1:
            dist.barrier()
        return out

    def save(self, reason: str) -> Path:
        from opsd_megatron.checkpointing import save_checkpoint

        return save_checkpoint(self.ckpt_root, self.step, self.chunks, self.optimizer, self.scheduler,
                               teacher=self.teacher, reason=reason)  # fmt: skip

    def _shard_hook(self):
        """Export hook merging LoRA into its base weight shard (None without LoRA)."""
        if not self.cfg.lora.enabled:
            return None
        from opsd_megatron.lora import merged_local_weight

        def hook(name: str, module: torch.nn.Module, shard: torch.Tensor) -> torch.Tensor:
            if name.endswith(".weight") and getattr(module, "lora", None) is not None:
                return merged_local_weight(module)
            return shard

        return hook

    def export_hf(self, out_dir: Path) -> None:
        """Write an HF checkpoint (LoRA merged) loadable by `transformers`; collective."""
        from opsd_megatron.conversion import save_hf_checkpoint

        tok = self.cfg.model.tokenizer or self.cfg.model.path
        save_hf_checkpoint(self.chunks, out_dir, tokenizer_dir=tok, shard_hook=self._shard_hook())
        if self.ps.rank == 0:
            log.info("exported HF checkpoint to %s", out_dir)

    def close(self) -> None:
        self.metrics.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
