"""GPU memory hand-off around generation (`rollout.offload_train_state`): the Megatron gradient buffers and
the optimizer state go to host memory while the rollout engine generates, and come back, bit for bit,
before the step trains.

    offload = TrainStateOffload(chunks, optimizer, enabled=cfg.rollout.offload_train_state)
    with offload.during_generation():
        samples, stats = strategy.samples(step)

What moves: each DDP chunk's fp32 gradient buffers (`grad_data` of every `_ParamAndGradBuffer`: copied to
a pinned host tensor, then the device storage is resized to 0; `param.main_grad` and the buckets' views keep
pointing at that storage and are valid again once it is resized back and the copy returns), and the
optimizer's fp32 main parameters and Adam moments (Megatron's `offload_to_cpu` / `restore_from_cpu`).
Model weights stay (the engine refresh and the teacher read them). Host memory held meanwhile: 4 bytes per
parameter for the gradients plus the optimizer's 12 (sharded over DP with the distributed optimizer).

On CPU there is nothing to hand off: the key is accepted and logged once as a no-op. No collectives.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)


def free_cached_memory() -> None:
    """`torch.cuda.empty_cache()` when CUDA is in use (before the rollout engine wakes: blocks the training
    step cached go back to the device for the engine's weights and KV cache); nothing on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def grad_buffers(chunks: list) -> list:
    """The Megatron `_ParamAndGradBuffer`s of DDP-wrapped `chunks` (dense and expert-parallel)."""
    out = []
    for c in chunks:
        out += list(getattr(c, "buffers", [])) + list(getattr(c, "expert_parallel_buffers", []))
    return [b for b in out if getattr(b, "grad_data", None) is not None]


def offload_grads(buffers: list) -> list[torch.Tensor]:
    """Copy each buffer's `grad_data` [n] to host memory (pinned when on CUDA) and free its device storage
    (views stay attached to it); returns the host copies for `restore_grads`."""
    saved = []
    for b in buffers:
        g = b.grad_data
        host = torch.empty(g.shape, dtype=g.dtype, device="cpu", pin_memory=g.is_cuda)
        host.copy_(g)
        g.untyped_storage().resize_(0)
        saved.append(host)
    return saved


def restore_grads(buffers: list, saved: list[torch.Tensor]) -> None:
    """Reallocate each buffer's `grad_data` storage and copy `saved[i]` back (exact)."""
    for b, host in zip(buffers, saved, strict=True):
        g = b.grad_data
        g.untyped_storage().resize_(host.numel() * host.element_size())
        g.copy_(host)


class TrainStateOffload:
    """Moves the gradient buffers and optimizer state of `chunks` / `optimizer` to host memory for the
    duration of `during_generation()` when `enabled` and CUDA is in use; otherwise a no-op (logged once
    when enabled on CPU)."""

    def __init__(self, chunks: list, optimizer, *, enabled: bool):
        self.chunks, self.optimizer = chunks, optimizer
        cuda = any(p.is_cuda for c in chunks for p in c.parameters())
        self.active = enabled and cuda
        if enabled and not cuda:
            logger.info("rollout.offload_train_state: no CUDA device, nothing to offload (no-op)")

    @contextmanager
    def during_generation(self):
        """Host-resident gradients and optimizer state inside the block; restored (exactly) on exit, also
        when the block raises."""
        if not self.active:
            yield
            return
        torch.cuda.synchronize()
        buffers = grad_buffers(self.chunks)
        saved = offload_grads(buffers)
        self.optimizer.offload_to_cpu()  # Megatron: main params + moments to host, then empty_cache()
        torch.cuda.empty_cache()
        try:
            yield
        finally:
            self.optimizer.restore_from_cpu()
            restore_grads(buffers, saved)
            torch.cuda.synchronize()
