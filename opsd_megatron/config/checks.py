"""The checks of an OPSD run configuration (`opsd_megatron.config` holds the dataclasses and the loader and
re-exports these three).

    validate(cfg)                  # what the config alone decides (choices, ranges, combinations)
    validate_model(cfg)            # against the model's config.json (TP/EP dividing heads/experts, layers)
    validate_world(cfg, world)     # against the process count (batch divisibility); returns the DP size

Each failure is one `ConfigError` naming the key. The config module is imported inside the functions (it
imports this one at load time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opsd_megatron.config import OPSDConfig


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        from opsd_megatron.config import ConfigError

        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: OPSDConfig) -> OPSDConfig:
    """Checks that need nothing but the config itself."""
    from opsd_megatron.config import _literal_fields

    for key, val, allowed in _literal_fields(cfg):  # also values set in code, not only loaded ones
        _check(val in allowed, key, f"must be one of {', '.join(allowed)}, got {val!r}.")
    _check(bool(cfg.model.path), "model.path", "is required (an HF model directory or hub name).")
    _check(bool(cfg.data.path), "data.path", "is required (a jsonl/parquet file or a hub dataset name).")
    for key, val in [("parallel.tp", cfg.parallel.tp), ("parallel.pp", cfg.parallel.pp)]:
        _check(val >= 1, key, f"must be >= 1, got {val}.")
    _check(cfg.parallel.ep >= 1, "parallel.ep", f"must be >= 1, got {cfg.parallel.ep}.")
    _check(cfg.parallel.etp is None or cfg.parallel.etp >= 1, "parallel.etp", "must be >= 1 or null.")
    aux = cfg.moe.aux_loss_coeff
    _check(aux is None or aux >= 0, "moe.aux_loss_coeff", f"must be >= 0 or null, got {aux}.")
    _check(cfg.moe.z_loss_coeff >= 0, "moe.z_loss_coeff", f"must be >= 0, got {cfg.moe.z_loss_coeff}.")
    _check(
        not cfg.parallel.sequence_parallel or cfg.parallel.tp > 1,
        "parallel.sequence_parallel",
        "needs tp > 1.",
    )
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
    r = cfg.rollout
    _check(
        r.temperature > 0, "rollout.temperature", f"must be > 0 for on-policy sampling, got {r.temperature}."
    )
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}.")
    _check(0 <= r.min_p < 1, "rollout.min_p", f"must be in [0, 1), got {r.min_p}.")
    _check(r.bucket_mb > 0, "rollout.bucket_mb", f"must be > 0, got {r.bucket_mb}.")
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
    pl = cfg.parallel.pipeline_layers
    if pl is not None:
        _check(
            len(pl) == cfg.parallel.pp,
            "parallel.pipeline_layers",
            f"has {len(pl)} entries, parallel.pp is {cfg.parallel.pp} (one layer count per stage).",
        )
        _check(min(pl) >= 1, "parallel.pipeline_layers", f"has a stage without layers: {pl}.")
        _check(
            len(set(pl[1:-1])) <= 1,
            "parallel.pipeline_layers",
            f"{pl}: the middle stages must hold equal layer counts (Megatron splits first/last/rest).",
        )
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
           f"must be in (0, 1], got {r.gpu_memory_utilization}.")  # fmt: skip
    _check(cfg.logging.rollout_interval >= 0, "logging.rollout_interval", "must be >= 0.")
    _check(cfg.logging.rollout_samples >= 1, "logging.rollout_samples", "must be >= 1.")
    lo = cfg.loss
    _check(0 <= lo.beta <= 1, "loss.beta", f"must be in [0, 1], got {lo.beta}.")
    _check(lo.kind == "jsd" or lo.beta == 0, "loss.beta", f"is only used with loss.kind=jsd (got {lo.kind}).")
    _check(lo.temperature is None or lo.temperature > 0, "loss.temperature", "must be > 0.")
    _check(lo.clip is None or lo.clip > 0, "loss.clip", f"must be > 0 or null, got {lo.clip}.")
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
    _check(
        0 < cfg.teacher.ema_decay < 1, "teacher.ema_decay", f"must be in (0, 1), got {cfg.teacher.ema_decay}."
    )
    _check(
        not (cfg.teacher.offload and cfg.lora.enabled),
        "teacher.offload",
        "has no effect with lora.enabled (the teacher is the base model with adapters off).",
    )
    _check(
        cfg.teacher.mode != "adapters_off" or cfg.lora.enabled,
        "teacher.mode",
        "adapters_off needs lora.enabled (without LoRA use mode=frozen for the initial weights).",
    )
    _check(not cfg.lora.enabled or cfg.lora.rank >= 1, "lora.rank", f"must be >= 1, got {cfg.lora.rank}.")
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}.")
    from opsd_megatron.mcore.lora.moe_checks import check_lora_config

    check_lora_config(cfg)  # lora.target_experts (MoE)
    o = cfg.optimizer
    _check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}.")
    _check(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, optimizer.lr], got {o.min_lr}.")
    _check(o.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0, got {o.clip_grad}.")
    _check(
        0 <= o.lr_warmup_steps <= t.steps,
        "optimizer.lr_warmup_steps",
        f"must be in [0, train.steps={t.steps}], got {o.lr_warmup_steps}.",
    )
    c = cfg.checkpoint
    _check(c.save_interval >= 0, "checkpoint.save_interval", f"must be >= 0, got {c.save_interval}.")
    _check(c.exit_signal_grace_s > 0, "checkpoint.exit_signal_grace_s", "must be > 0.")
    _check(c.export_hf_interval >= 0, "checkpoint.export_hf_interval", "must be >= 0.")
    _check(cfg.eval.interval >= 0, "eval.interval", f"must be >= 0, got {cfg.eval.interval}.")
    _check(
        cfg.eval.interval == 0 or bool(cfg.eval.path or cfg.eval.benchmarks),
        "eval.path",
        "is required when eval.interval > 0 (or set eval.benchmarks).",
    )
    _check(bool(cfg.sft.formats), "sft.formats", "must name at least one of student, teacher.")
    _check(
        cfg.algorithm != "sft" or cfg.eval.interval == 0,
        "eval.interval",
        "must be 0 with algorithm=sft (no rollout engine); evaluate its HF export with opsd-eval.",
    )
    for fmt in cfg.sft.formats:
        _check(fmt in ("student", "teacher"), "sft.formats", f"lists student/teacher, got {fmt!r}.")
    for key, tmpl, needed in [
        ("prompts.student_template", cfg.prompts.student_template, ["{problem}"]),
        ("prompts.teacher_template", cfg.prompts.teacher_template, ["{problem}", "{solution}"]),
    ]:
        for n in needed:
            _check(n in tmpl, key, f"must contain the placeholder {n}.")
    return cfg


def validate_model(cfg: OPSDConfig, hf_config: dict | None = None) -> None:
    """Checks against the model's `config.json` (read from model.path when it is a local directory)."""
    if hf_config is None:
        p = Path(cfg.model.path) / "config.json"
        if not p.is_file():
            return  # hub name: checked when the model is built
        hf_config = json.loads(p.read_text())
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    heads = hf_config.get("num_attention_heads")
    groups = hf_config.get("num_key_value_heads", heads)
    layers = hf_config.get("num_hidden_layers")
    if heads is not None:
        _check(heads % tp == 0, "parallel.tp", f"{tp} does not divide the model's {heads} attention heads.")
    if groups is not None:
        _check(groups % tp == 0, "parallel.tp", f"{tp} does not divide the model's {groups} key/value heads.")
    pl = cfg.parallel.pipeline_layers
    if layers is not None and pl is not None:
        _check(
            sum(pl) == layers,
            "parallel.pipeline_layers",
            f"{pl} sums to {sum(pl)}, but the model has {layers} layers.",
        )
    elif layers is not None:
        _check(
            layers % pp == 0,
            "parallel.pp",
            f"{pp} does not divide the model's {layers} layers (set parallel.pipeline_layers for an uneven "
            "split).",
        )
    engine_tp = cfg.rollout.tensor_parallel_size
    if heads is not None:
        _check(
            heads % engine_tp == 0,
            "rollout.tensor_parallel_size",
            f"{engine_tp} does not divide the model's {heads} attention heads.",
        )
    if groups is not None:
        _check(
            groups % engine_tp == 0 or engine_tp % groups == 0,
            "rollout.tensor_parallel_size",
            f"{engine_tp} and the model's {groups} key/value heads must divide one another (vLLM).",
        )
    from opsd_megatron.mcore.models.hf_config import hf_num_experts

    experts = hf_num_experts(hf_config)
    ep = cfg.parallel.ep
    if experts:
        _check(experts % ep == 0, "parallel.ep", f"{ep} does not divide the model's {experts} experts.")
        _check(
            tp == 1 or cfg.parallel.sequence_parallel,
            "parallel.sequence_parallel",
            f"must be true for a mixture-of-experts model at parallel.tp={tp}: megatron-core's MoE layer "
            "refuses to train with tensor parallelism but without sequence parallelism.",
        )
    else:
        _check(ep == 1, "parallel.ep", f"is {ep}, but the model has no experts (not a mixture-of-experts).")
    from opsd_megatron.mcore.lora.moe_checks import check_lora_model

    check_lora_model(cfg, hf_config)  # lora.target_experts (MoE)


def validate_world(cfg: OPSDConfig, world_size: int) -> int:
    """Checks against the process count; returns the data-parallel size."""
    mp = cfg.parallel.tp * cfg.parallel.pp
    if world_size % mp:
        from opsd_megatron.config import ConfigError

        raise ConfigError(
            f"config keys 'parallel.tp' x 'parallel.pp' = {cfg.parallel.tp} x {cfg.parallel.pp} = {mp} "
            f"do not divide the {world_size} process(es) started (torchrun --nproc-per-node / srun --ntasks)."
        )
    dp = world_size // mp
    engine_tp = cfg.rollout.tensor_parallel_size
    _check(
        world_size % engine_tp == 0,
        "rollout.tensor_parallel_size",
        f"{engine_tp} does not divide the world size {world_size} (engines: consecutive ranks).",
    )
    ep, etp = cfg.parallel.ep, cfg.parallel.etp or cfg.parallel.tp
    _check(
        world_size % (ep * etp * cfg.parallel.pp) == 0,
        "parallel.ep",
        f"ep x etp x pp = {ep} x {etp} x {cfg.parallel.pp} does not divide the world size {world_size}.",
    )
    t = cfg.train
    _check(
        t.global_batch_size % (t.micro_batch_size * dp) == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by train.micro_batch_size x data-parallel size "
        f"= {t.micro_batch_size} x {dp}.",
    )
    return dp
