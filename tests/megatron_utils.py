"""Shared test helper: one next-token forward/backward through Megatron's own pipeline schedule (no DDP).

Importable from spawned test ranks (tests/ is on the spawned processes' sys.path).
"""

from __future__ import annotations

import torch


def lm_forward_backward(chunks: list, x: torch.Tensor, labels: torch.Tensor) -> None:
    """Accumulate into `.grad` the gradient of mean next-token CE over `x` [b, s] / `labels` [b, s].

    Runs `get_forward_backward_func()` with one micro-batch, then does by hand what Megatron's
    `finalize_model_grads` does under DDP: all-reduce the tied embedding grads over the embedding group
    (first + last stage) and the q/k-norm grads over TP (each TP rank only sees its own heads).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = chunks[0]
    b, s = x.shape

    def step(data_iter, m):
        ids, lab = next(data_iter)
        out = m(ids, torch.arange(s).expand(b, s), None, labels=lab)  # last stage: per-token loss [b, s]

        def loss_fn(t):
            loss = t.float().sum() / lab.numel()
            return loss, {"loss": loss.detach()}

        return out, loss_fn

    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([(x, labels)]),
        model=chunks,
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=False,
    )
    tied = mps.get_pipeline_model_parallel_world_size() > 1 and model.share_embeddings_and_output_weights
    if tied and (mps.is_pipeline_first_stage() or mps.is_pipeline_last_stage()):
        dist.all_reduce(model.shared_embedding_or_output_weight().grad, group=mps.get_embedding_group())
    if mps.get_tensor_model_parallel_world_size() > 1:
        for name, p in model.named_parameters():
            if ("q_layernorm" in name or "k_layernorm" in name) and p.grad is not None:
                dist.all_reduce(p.grad, group=mps.get_tensor_model_parallel_group())
