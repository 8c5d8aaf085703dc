"""Megatron training plumbing for the trainer: DDP wrapping, the Megatron optimizer, the LR schedule.

    chunks = wrap_ddp(chunks)                          # Megatron DistributedDataParallel per chunk
    optimizer = build_optimizer(cfg.optimizer, chunks, dtype)
    scheduler = build_scheduler(cfg.optimizer, optimizer, total_steps)

On GPU the distributed optimizer (optimizer states sharded over data-parallel ranks) is used; on CPU the plain
Megatron optimizer (the distributed one needs CUDA). Gradients are reduced over the data-parallel group by
`finalize_model_grads` (installed on the model config, so Megatron's schedules call it after the last
micro-batch), which also all-reduces tied embedding gradients between the first and last pipeline stages.
"""

from __future__ import annotations

from typing import Any

import torch


def wrap_ddp(chunks: list, *, use_distributed_optimizer: bool | None = None) -> list:
    """Wrap each GPTModel chunk in Megatron `DistributedDataParallel` (fp32 grad buffers, no overlap)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if use_distributed_optimizer is None:
        use_distributed_optimizer = torch.cuda.is_available()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def install_schedule_hooks(chunks: list, optimizer: Any = None) -> None:
    """Set the model-config hooks Megatron's schedules call (no_sync, finalize grads, loss scale)."""
    from megatron.core.distributed import finalize_model_grads

    config = chunks[0].config
    no_sync = [c.no_sync for c in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if optimizer is not None:
        config.grad_scale_func = optimizer.scale_loss


def build_optimizer(opt_cfg: Any, chunks: list, dtype: torch.dtype) -> Any:
    """Megatron AdamW (`get_megatron_optimizer`) with global grad-norm clipping `opt_cfg.clip_grad`."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    use_dist = bool(chunks[0].ddp_config.use_distributed_optimizer)
    config = OptimizerConfig(
        optimizer="adam",
        lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=use_dist,
    )
    # opsd_megatron.mcore.parallel creates no gloo twins of the groups in a gloo world (they are gloo
    # already).
    import torch.distributed as dist

    use_gloo = not (dist.is_initialized() and dist.get_backend() == "gloo")
    return get_megatron_optimizer(config, chunks, use_gloo_process_groups=use_gloo)


def build_scheduler(opt_cfg: Any, optimizer: Any, total_steps: int) -> Any:
    """Megatron `OptimizerParamScheduler`: linear warm-up, then constant / linear / cosine decay to min_lr."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = opt_cfg.lr_warmup_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else opt_cfg.lr,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr if opt_cfg.lr_decay_style != "constant" else opt_cfg.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=opt_cfg.lr_decay_style,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def current_lr(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])
