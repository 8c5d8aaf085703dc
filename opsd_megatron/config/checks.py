"""The checks of an OPSD run configuration, one function per section; torch-free.

    validate(cfg)                  # what the config alone decides (choices, ranges, combinations)
    validate_model(cfg)            # against the model's config.json (TP/EP dividing heads/experts, layers)
    validate_context(cfg)          # prompt + generation budget within the model's context (run.preflight)
    validate_world(cfg, world)     # against the process count (batch divisibility); returns the DP size

Each failure is one `ConfigError` naming the key. One value is corrected instead: `optimizer.lr_warmup_steps`
larger than `train.steps` (a shortened recipe) is clamped to it, with one warning (rank 0). The
parallel-layout rules themselves are declared once in `opsd_megatron.mcore.layout` (shared with
`mcore.parallel` and the model builder) and re-raised here as `ConfigError`; the names `lora.target_modules`
accepts are `config.lora_targets` (checked here). The one LoRA check that depends on the machine
(grouped-GEMM experts) is `mcore.lora.moe_checks.check_lora_backend`.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opsd_megatron.config.lora_refresh import adapters_blocker
from opsd_megatron.config.lora_targets import names_mlp, resolve_parts
from opsd_megatron.config.schema import (
    ConfigError,
    OPSDConfig,
    SftFormat,
    choice_text,
    is_choice,
    literal_fields,
)
from opsd_megatron.mcore.layout import (
    LayoutError,
    check_model_layout,
    check_pipeline_layers,
    check_world,
    env_rank,
    hf_context_len,
    hf_dense_mlp_layers,
    hf_num_experts,
)

__all__ = ["engine_max_model_len", "validate", "validate_context", "validate_model", "validate_world"]

log = logging.getLogger("opsd_megatron")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _layout(rule: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a `mcore.layout` rule; its `LayoutError` becomes a `ConfigError` with the same sentence."""
    try:
        return rule(*args, **kwargs)
    except LayoutError as e:
        raise ConfigError(str(e)) from None


# ---- validate: one function per section --------------------------------------------------------------------
def _check_choices_and_paths(cfg: OPSDConfig) -> None:
    for key, val, allowed in literal_fields(cfg):  # also values set in code, not only loaded ones
        _check(is_choice(val, allowed), key, f"must be one of {choice_text(allowed)}, got {val!r}.")
    _check(bool(cfg.model.path), "model.path", "is required (an HF model directory or hub name).")
    _check(bool(cfg.data.path), "data.path", "is required (a jsonl/parquet file or a hub dataset name).")


def _check_parallel(cfg: OPSDConfig) -> None:
    p = cfg.parallel
    for key, val in [
        ("parallel.tp", p.tp),
        ("parallel.pp", p.pp),
        ("parallel.ep", p.ep),
        ("parallel.cp", p.cp),
    ]:
        _check(val >= 1, key, f"must be >= 1, got {val}.")
    _check(p.etp is None or p.etp >= 1, "parallel.etp", "must be >= 1 or null.")
    _check(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel", "needs tp > 1.")
    _check(p.cp == 1 or p.pp == 1, "parallel.cp",
           f"{p.cp} with parallel.pp {p.pp} is not supported; use pp 1.")  # fmt: skip
    _check(p.cp == 1 or cfg.algorithm == "opsd", "parallel.cp",
           f"{p.cp} is supported by algorithm=opsd only (algorithm is {cfg.algorithm}); use 1.")  # fmt: skip
    _check(p.timeout_minutes > 0, "parallel.timeout_minutes", f"must be > 0, got {p.timeout_minutes}.")
    _layout(check_pipeline_layers, p.pipeline_layers, p.pp)


def _check_recompute(cfg: OPSDConfig) -> None:
    m = cfg.model
    n = m.recompute_num_layers
    _check(n is None or n >= 1, "model.recompute_num_layers", f"must be >= 1 or null, got {n}.")
    _check(n is None or m.recompute == "full", "model.recompute_num_layers",
           f"applies to model.recompute=full only (model.recompute is {m.recompute}).")  # fmt: skip


def _check_moe(cfg: OPSDConfig) -> None:
    aux, z = cfg.moe.aux_loss_coeff, cfg.moe.z_loss_coeff
    _check(aux is None or aux >= 0, "moe.aux_loss_coeff", f"must be >= 0 or null, got {aux}.")
    _check(z >= 0, "moe.z_loss_coeff", f"must be >= 0, got {z}.")


def _check_train(cfg: OPSDConfig) -> None:
    t = cfg.train
    for key, val in [
        ("train.steps", t.steps),
        ("train.global_batch_size", t.global_batch_size),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.pad_to_multiple", t.pad_to_multiple),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
        ("prompts.max_prompt_tokens", cfg.prompts.max_prompt_tokens),
    ]:
        _check(val >= 1, key, f"must be >= 1, got {val}.")
    _check(
        t.global_batch_size % t.micro_batch_size == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}.",
    )


def _check_rollout(cfg: OPSDConfig) -> None:
    r = cfg.rollout
    _check(
        r.temperature > 0, "rollout.temperature", f"must be > 0 for on-policy sampling, got {r.temperature}."
    )
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}.")
    _check(0 <= r.min_p < 1, "rollout.min_p", f"must be in [0, 1), got {r.min_p}.")
    _check(r.bucket_mb > 0, "rollout.bucket_mb", f"must be > 0, got {r.bucket_mb}.")
    _check(r.drift_threshold is None or r.drift_threshold > 0, "rollout.drift_threshold",
           f"must be > 0 or null (only log the drift), got {r.drift_threshold}.")  # fmt: skip
    _check(
        r.tensor_parallel_size >= 1,
        "rollout.tensor_parallel_size",
        f"must be >= 1, got {r.tensor_parallel_size}.",
    )
    _check(
        r.tensor_parallel_size == 1 or r.engine == "vllm",
        "rollout.tensor_parallel_size",
        f"> 1 needs rollout.engine=vllm (the {r.engine} engine has no tensor parallelism).",
    )
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
           f"must be in (0, 1], got {r.gpu_memory_utilization}.")  # fmt: skip
    _check(cfg.loss.behaviour_cap > 0, "loss.behaviour_cap", f"must be > 0, got {cfg.loss.behaviour_cap}.")
    _check(r.max_staleness in (0, 1), "rollout.max_staleness", f"must be 0 or 1, got {r.max_staleness}.")
    _check(
        r.max_staleness == 0 or r.placement == "separate",
        "rollout.max_staleness",
        "1 needs rollout.placement=separate (colocated engines cannot generate while training).",
    )
    _check(r.engine_replicas >= 1, "rollout.engine_replicas", f"must be >= 1, got {r.engine_replicas}.")
    _check(r.placement == "colocated" or cfg.algorithm == "opsd", "rollout.placement",
           f"separate needs algorithm=opsd (algorithm={cfg.algorithm} has no rollout engine).")  # fmt: skip
    _check_lora_refresh(cfg, moe=False)


def _check_lora_refresh(cfg: OPSDConfig, moe: bool) -> None:
    """An explicit `rollout.lora_refresh: adapters` the engines cannot serve (config/lora_refresh.py)."""
    why = adapters_blocker(cfg, moe) if cfg.rollout.lora_refresh == "adapters" else None
    _check(why is None, "rollout.lora_refresh",
           f"adapters cannot be served: {why}; use merged (or auto, which picks merged here).")  # fmt: skip


def _check_logging(cfg: OPSDConfig) -> None:
    _check(cfg.logging.rollout_interval >= 0, "logging.rollout_interval", "must be >= 0.")
    _check(cfg.logging.rollout_samples >= 1, "logging.rollout_samples", "must be >= 1.")


def _check_loss(cfg: OPSDConfig) -> None:
    lo = cfg.loss
    _check(
        lo.kind != "jsd" or lo.beta is not None,
        "loss.beta",
        "is required with loss.kind=jsd (M = beta p_T + (1-beta) p_S; 0 = forward KL, 1 = reverse KL).",
    )
    _check(lo.beta is None or 0 <= lo.beta <= 1, "loss.beta", f"must be in [0, 1], got {lo.beta}.")
    _check(
        lo.kind in ("jsd", "top_k") or lo.beta is None,
        "loss.beta",
        f"is only used with loss.kind=jsd or top_k (got {lo.kind}).",
    )
    _check(lo.temperature is None or lo.temperature > 0, "loss.temperature", "must be > 0.")
    _check(
        lo.clip in (None, "default") or (isinstance(lo.clip, (int, float)) and lo.clip > 0),
        "loss.clip",
        f"must be > 0, null (no clip) or default (the kind's), got {lo.clip}.",
    )
    _check(
        lo.kind != "top_k" or (lo.top_k is not None and lo.top_k >= 1),
        "loss.top_k",
        f"must be an integer >= 1 with loss.kind=top_k, got {lo.top_k}.",
    )
    _check(
        lo.kind == "top_k" or lo.top_k is None,
        "loss.top_k",
        f"is only used with loss.kind=top_k (got {lo.kind}).",
    )
    _check(
        0 <= lo.skip_first_tokens < cfg.rollout.max_new_tokens,
        "loss.skip_first_tokens",
        f"must be in [0, rollout.max_new_tokens={cfg.rollout.max_new_tokens}), got {lo.skip_first_tokens}.",
    )
    _check(lo.chunk_tokens is None or lo.chunk_tokens >= 1, "loss.chunk_tokens", "must be >= 1 or null.")


def _check_teacher(cfg: OPSDConfig) -> None:
    t = cfg.teacher
    _check(0 < t.ema_decay < 1, "teacher.ema_decay", f"must be in (0, 1), got {t.ema_decay}.")
    _check(
        not (t.offload and cfg.lora.enabled),
        "teacher.offload",
        "has no effect with lora.enabled (the teacher is the base model with adapters off).",
    )
    _check(
        t.mode != "adapters_off" or cfg.lora.enabled,
        "teacher.mode",
        "adapters_off needs lora.enabled (without LoRA use mode=frozen for the initial weights).",
    )


def _check_lora(cfg: OPSDConfig) -> None:
    """LoRA ranges, target names, and `lora.target_experts` (MoE) against the rest of the config."""
    lo = cfg.lora
    _check(not lo.enabled or lo.rank >= 1, "lora.rank", f"must be >= 1, got {lo.rank}.")
    if lo.enabled:
        try:
            resolve_parts(lo.target_modules)
        except ValueError as e:  # an unknown layer name: now, not after the model is built
            raise ConfigError(f"config key '{e}".replace(":", "':", 1)) from None
    _check(0 <= lo.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lo.dropout}.")
    if not lo.target_experts:
        return
    _check(lo.enabled, "lora.target_experts", "is true but lora.enabled is false (set both, or neither).")
    etp = cfg.parallel.etp or cfg.parallel.tp
    _check(
        etp == 1 or etp == cfg.parallel.tp,
        "parallel.etp",
        f"is {etp} with lora.target_experts, but parallel.tp is {cfg.parallel.tp}: an expert adapter's "
        "replicated factor (A of fc1, B of fc2) lives on every expert-TP rank, and Megatron's grad-norm "
        "counts a replicated parameter once per TP group, not per expert-TP group. Use expert-TP 1 or "
        "equal to parallel.tp.",
    )
    _check(
        names_mlp(lo.target_modules) is not False,
        "lora.target_experts",
        "is true, but lora.target_modules names no MLP projection (gate_proj, up_proj, down_proj) to "
        f"adapt in the experts: {list(lo.target_modules)}.",
    )


def _check_optimizer(cfg: OPSDConfig) -> None:
    o, steps = cfg.optimizer, cfg.train.steps
    _check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}.")
    _check(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, optimizer.lr], got {o.min_lr}.")
    _check(o.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0, got {o.clip_grad}.")
    _check(o.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps", f"must be >= 0, got {o.lr_warmup_steps}.")
    if o.lr_warmup_steps > steps:  # a shortened run (train.steps=6 on a recipe): warm up over all of it
        if env_rank() == 0:  # the config's one warning comes from rank 0 only
            log.warning("config key 'optimizer.lr_warmup_steps': %d is more than train.steps=%d; the warm-up "
                        "is clamped to %d steps.", o.lr_warmup_steps, steps, steps)  # fmt: skip
        o.lr_warmup_steps = steps


def _check_checkpoint(cfg: OPSDConfig) -> None:
    c = cfg.checkpoint
    _check(c.save_interval >= 0, "checkpoint.save_interval", f"must be >= 0, got {c.save_interval}.")
    _check(c.exit_signal_grace_s > 0, "checkpoint.exit_signal_grace_s", "must be > 0.")
    _check(c.stop_deadline_s is None or c.stop_deadline_s > 0, "checkpoint.stop_deadline_s",
           f"must be > 0 seconds or null, got {c.stop_deadline_s}.")  # fmt: skip
    _check(c.export_hf_interval >= 0, "checkpoint.export_hf_interval", "must be >= 0.")
    _check(
        c.keep_last is None or c.keep_last >= 1,
        "checkpoint.keep_last",
        f"must be >= 1 (or null to keep every checkpoint), got {c.keep_last}.",
    )


def _check_eval_and_sft(cfg: OPSDConfig) -> None:
    _check(cfg.eval.interval >= 0, "eval.interval", f"must be >= 0, got {cfg.eval.interval}.")
    _check(
        cfg.eval.interval == 0 or bool(cfg.eval.path or cfg.eval.benchmarks),
        "eval.path",
        "is required when eval.interval > 0 (or set eval.benchmarks).",
    )
    formats = typing.get_args(SftFormat)
    _check(bool(cfg.sft.formats), "sft.formats", f"must name at least one of {', '.join(formats)}.")
    _check(
        cfg.algorithm != "sft" or cfg.eval.interval == 0,
        "eval.interval",
        "must be 0 with algorithm=sft (no rollout engine); evaluate its HF export with opsd-eval.",
    )


def _check_prompts(cfg: OPSDConfig) -> None:
    for key, tmpl, needed in [
        ("prompts.student_template", cfg.prompts.student_template, ["{problem}"]),
        ("prompts.teacher_template", cfg.prompts.teacher_template, ["{problem}", "{solution}"]),
    ]:
        for n in needed:
            _check(n in tmpl, key, f"must contain the placeholder {n}.")


_SECTIONS = (
    _check_choices_and_paths,
    _check_parallel,
    _check_recompute,
    _check_moe,
    _check_train,
    _check_rollout,
    _check_logging,
    _check_loss,
    _check_teacher,
    _check_lora,
    _check_optimizer,
    _check_checkpoint,
    _check_eval_and_sft,
    _check_prompts,
)


def validate(cfg: OPSDConfig) -> OPSDConfig:
    """Checks that need nothing but the config itself (every section, in order); returns `cfg`."""
    for check in _SECTIONS:
        check(cfg)
    return cfg


# ---- against the model and the world ---------------------------------------------------------------------
def _check_lora_model(cfg: OPSDConfig, hf_config: dict) -> None:
    """LoRA against the model's config.json: expert adapters need experts; a PEFT export cannot hold the
    dense-layer MLP adapters of a mixture-of-experts model."""
    lo = cfg.lora
    if not lo.enabled:
        return
    experts = hf_num_experts(hf_config)
    _check_lora_refresh(cfg, moe=bool(experts))
    _check(
        experts or not lo.target_experts,
        "lora.target_experts",
        "is true, but the model has no experts (not a mixture-of-experts).",
    )
    dense = hf_dense_mlp_layers(hf_config) if experts else []
    _check(
        not (dense and lo.export_peft and cfg.checkpoint.export_hf and names_mlp(lo.target_modules)),
        "lora.export_peft",
        f"the model's layers {dense[:8]} have a dense MLP, and lora.target_modules adapts MLP "
        "projections: peft (with transformers 5) maps gate_proj/up_proj/down_proj of a "
        "mixture-of-experts model to its experts, so a PEFT adapter cannot hold the dense layers' MLP "
        "adapters. Set lora.export_peft: false (the merged HF export still holds them) or leave "
        "gate_proj/up_proj/down_proj out of lora.target_modules.",
    )


def engine_max_model_len(cfg: OPSDConfig) -> int:
    """`prompts.max_prompt_tokens` + the largest of `rollout.max_new_tokens` and (evaluation on)
    `eval.max_new_tokens`: the sequence the colocated rollout engine must hold, every generation it serves
    (`run.setup.start_engine`). vLLM stops a request that reaches `max_model_len` with finish reason "length"
    and no error, so an engine sized for rollouts alone would silently cut every long evaluation answer."""
    budget = cfg.rollout.max_new_tokens
    if cfg.eval.interval:
        budget = max(budget, cfg.eval.max_new_tokens)
    return cfg.prompts.max_prompt_tokens + budget


def validate_context(cfg: OPSDConfig, hf_config: dict | None = None) -> None:
    """The engine's sequence (prompt + generation budget, `engine_max_model_len`) fits the model's context
    (config.json read from model.path when it is a local directory). Run by `run.preflight` after the
    layout and world checks; vLLM would refuse it only once the model is built. `algorithm: sft` builds no
    engine and generates nothing: no check."""
    if cfg.algorithm == "sft":
        return
    if hf_config is None:
        p = Path(cfg.model.path) / "config.json"
        if not p.is_file():
            return  # hub name
        hf_config = json.loads(p.read_text())
    context, need = hf_context_len(hf_config), engine_max_model_len(cfg)
    if context is None or need <= context:
        return
    r, e = cfg.rollout, cfg.eval
    key, new = "rollout.max_new_tokens", r.max_new_tokens
    if e.interval and e.max_new_tokens > r.max_new_tokens:
        key, new = "eval.max_new_tokens", e.max_new_tokens
    raise ConfigError(
        f"config key '{key}': prompts.max_prompt_tokens ({cfg.prompts.max_prompt_tokens}) + {key} ({new}) = "
        f"{need} tokens, more than the model's context of {context} (max_position_embeddings in "
        f"{cfg.model.path}/config.json); lower one of them."
    )


def validate_model(cfg: OPSDConfig, hf_config: dict | None = None) -> None:
    """Checks against the model's `config.json` (read from model.path when it is a local directory)."""
    if hf_config is None:
        p = Path(cfg.model.path) / "config.json"
        if not p.is_file():
            return  # hub name: checked when the model is built
        hf_config = json.loads(p.read_text())
    par = cfg.parallel
    _layout(check_model_layout, hf_config, tp=par.tp, pp=par.pp, pipeline_layers=par.pipeline_layers,
            ep=par.ep, sequence_parallel=par.sequence_parallel,
            engine_tp=cfg.rollout.tensor_parallel_size)  # fmt: skip
    _check_lora_model(cfg, hf_config)


def validate_world(cfg: OPSDConfig, world_size: int) -> int:
    """Checks against the process count; returns the data-parallel size."""
    par = cfg.parallel
    dp = _layout(check_world, world_size, par.tp, par.pp, par.ep, par.etp, par.cp)
    engine_tp = cfg.rollout.tensor_parallel_size
    _check(
        world_size % engine_tp == 0 or cfg.rollout.placement == "separate",
        "rollout.tensor_parallel_size",
        f"{engine_tp} does not divide the world size {world_size} (engines: consecutive ranks).",
    )
    t = cfg.train
    _check(
        t.global_batch_size % (t.micro_batch_size * dp) == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by train.micro_batch_size x data-parallel size "
        f"= {t.micro_batch_size} x {dp}.",
    )
    return dp
