"""Vocabulary-parallel divergence between teacher and student next-token distributions.

    from opsd_megatron.losses import vocab_parallel_divergence
    per_token = vocab_parallel_divergence(student_logits, teacher_logits, kind="forward_kl",
                                          temperature=1.1, clip=0.05, loss_mask=mask, tp_group=tp_group)

Logits are sharded over the vocabulary as Megatron's column-parallel LM head leaves them: `[..., v/tp]`,
rank r holding the r-th contiguous slice. The per-position loss `[...]` (fp32) is identical on every TP rank
and the gradient reaching rank r's shard is the gradient of that one loss (as `vocab_parallel_cross_entropy`).

Collectives, dense kinds (forward_kl / reverse_kl / jsd), per chunk of rows: forward = one all-gather of the
local (max, sum-exp) of student and teacher [2, 2, c] + one all-reduce SUM [2, c] (loss and the gradient
scalar); backward = none (the gradient is computed in forward and scaled by the incoming gradient). Sparse
kinds: see `sparse.py`.

Padding: Megatron pads the vocabulary to a multiple of `make_vocab_size_divisible_by * tp` and its
`vocab_parallel_cross_entropy` lets the padded logits into the softmax. Here pass `vocab_size` (the real,
unpadded global vocabulary size) and the entries at global index >= vocab_size are ignored (probability 0,
zero gradient). Shards are equal by default (rank r starts at r * v_local); pass `vocab_start_index` for
unequal shards.
"""

from __future__ import annotations

import os

import torch

from opsd_megatron.losses._math import (
    ALL_KINDS,
    DENSE_KINDS,
    TOP_K_KINDS,
    dense_forward,
    effective_dense_kind,
    resolve_group,
    scaled_fp32,
    shard_layout,
)
from opsd_megatron.losses._phases import agreed_chunk_size, dense_chunk, grad_from_saved_
from opsd_megatron.losses.sparse import sampled_token_divergence, topk_divergence


class _VocabParallelDenseDivergence(torch.autograd.Function):
    """Dense divergence on vocabulary shards; collectives only in forward (see module docstring).

    On CUDA, rows are processed in chunks by the phases of `_phases.py` (Triton kernels via torch.compile);
    on CPU by `dense_forward` in one eager pass (OPSD_LOSS_FORCE_PHASES=1: the phases, for tests). The
    gradient `[N, v]` is computed in forward (CUDA: in the logits' dtype; CPU: fp32) and only scaled by the
    incoming gradient in backward.
    """

    @staticmethod
    def forward(ctx, student, teacher, mask, kind, beta, temperature, clip, n_valid, group):
        ctx.meta = (student.shape, student.dtype)
        if not (student.is_cuda or os.environ.get("OPSD_LOSS_FORCE_PHASES") == "1"):  # CPU: one eager pass
            return _dense_forward_eager(
                ctx, student, teacher, mask, kind, beta, temperature, clip, n_valid, group
            )
        x_s = student.detach().reshape(-1, student.shape[-1])  # (N, v)
        x_t = teacher.detach().reshape(-1, teacher.shape[-1])  # (N, v)
        n = x_s.shape[0]
        need_grad = ctx.needs_input_grad[0]
        acc = torch.promote_types(student.dtype, torch.float32)
        loss = x_s.new_empty(n, dtype=acc)
        grad = torch.zeros_like(x_s) if need_grad else None  # (N, v); padded columns stay 0
        chunk = agreed_chunk_size(n_valid, n, x_s.is_cuda, group)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            ls, lt = x_s[a:b, :n_valid], x_t[a:b, :n_valid]  # views: never written
            loss_c, _, saved, _ = dense_chunk(
                ls, lt, kind=kind, beta=beta, temperature=temperature, clip=clip, group=group, need_grad=False
            )
            loss[a:b] = loss_c
            if need_grad:
                scale = mask[a:b].to(acc) if mask is not None else torch.ones_like(loss_c)
                grad_from_saved_(
                    ls, lt, saved, scale, kind=kind, beta=beta, temperature=temperature, clip=clip,
                    out=grad[a:b, :n_valid],
                )  # fmt: skip
        if mask is not None:
            loss = loss * mask
        if need_grad:
            ctx.save_for_backward(grad)
        return loss.reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        shape, dtype = ctx.meta
        grad = grad * grad_loss.reshape(-1, 1).to(grad.dtype)  # (N, v); not in place: backward may run twice
        return grad.to(dtype).reshape(shape), None, None, None, None, None, None, None, None


def _dense_forward_eager(ctx, student, teacher, mask, kind, beta, temperature, clip, n_valid, group):
    """The CPU forward of `_VocabParallelDenseDivergence`: `dense_forward` on the whole `[N, v]` shard."""
    z_s = scaled_fp32(student.detach(), n_valid, temperature)  # (N, v) fp32
    z_t = scaled_fp32(teacher.detach(), n_valid, temperature)  # (N, v) fp32
    need_grad = ctx.needs_input_grad[0]
    loss, grad, _ = dense_forward(z_s, z_t, kind=kind, beta=beta, clip=clip, group=group, need_grad=need_grad)
    if mask is not None:
        loss = loss * mask
    if need_grad:
        grad.mul_((mask / temperature).unsqueeze(-1) if mask is not None else 1.0 / temperature)
        if n_valid < student.shape[-1]:
            grad = torch.nn.functional.pad(grad, (0, student.shape[-1] - n_valid))  # (N, v) padding: 0
        ctx.save_for_backward(grad)
    return loss.reshape(student.shape[:-1])


def validate_args(
    *, kind, beta, temperature, clip, top_k, target_ids, loss_mask, positions_shape, local_vocab
) -> None:
    """Raise one clear ValueError for a user error in the divergence arguments."""
    if kind not in ALL_KINDS:
        raise ValueError(f"kind must be one of {ALL_KINDS}, got {kind!r}.")
    if beta is None and kind == "jsd":
        raise ValueError(
            "kind='jsd' needs beta (M = beta p_T + (1-beta) p_S; 0 = forward KL, 1 = reverse KL)."
        )
    if beta is not None and not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}.")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if clip is not None and not float(clip) > 0.0:
        raise ValueError(f"clip must be None or > 0 (the pointwise clamp tau), got {clip}.")
    if kind in TOP_K_KINDS and (top_k is None or int(top_k) < 1):
        raise ValueError(f"kind={kind!r} needs top_k >= 1, got top_k={top_k}.")
    if kind == "sampled_token":
        if target_ids is None:
            raise ValueError(
                "kind='sampled_token' needs target_ids (the sampled token ids, shape logits[:-1])."
            )
        if tuple(target_ids.shape) != tuple(positions_shape):
            raise ValueError(
                f"target_ids must have shape {tuple(positions_shape)} (logits without the vocab dim), "
                f"got {tuple(target_ids.shape)}."
            )
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(positions_shape):
        raise ValueError(
            f"loss_mask must have shape {tuple(positions_shape)} (logits without the vocab dim), "
            f"got {tuple(loss_mask.shape)}."
        )
    if local_vocab < 1:
        raise ValueError("logits must have a non-empty last (vocabulary shard) dimension.")


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    clip: float | None = None,
    loss_mask: torch.Tensor | None = None,
    tp_group=None,
    top_k: int | None = None,
    target_ids: torch.Tensor | None = None,
    vocab_size: int | None = None,
    vocab_start_index: int | None = None,
) -> torch.Tensor:
    """Per-position divergence between teacher and student on vocabulary-sharded logits.

    Args:
        student_logits: `[..., v/tp]` (any float dtype; math in fp32), this rank's vocabulary shard.
        teacher_logits: `[..., v/tp]`, same shape; treated as a constant (no gradient flows to it).
        kind: "forward_kl" KL(p_T||p_S) | "reverse_kl" KL(p_S||p_T) | "jsd" generalised JSD(beta) with
            M = beta p_T + (1-beta) p_S (beta = 0 is exactly forward KL, beta = 1 exactly reverse KL) |
            "top_k" over the teacher's global top-`top_k` ids + a tail bucket (log-sum-exp of the rest) |
            "top_k_renorm" p_T and p_S restricted to those ids and renormalised; both top-k kinds: forward
            KL at beta = 0, JSD(beta) otherwise (the OPSD reference's top-k script: renorm, beta = 0.5) |
            "sampled_token" -stop_grad(log p_T(y) - log p_S(y)) * log p_S(y) at `target_ids` y.
        beta: JSD mixture weight: required by kind="jsd"; the top-k kinds: None or 0 = forward KL over the
            buckets, else JSD(beta).
        temperature: both logits are divided by it before the softmax (gradient w.r.t. the raw logits).
        clip: pointwise clamp tau: each per-(position, vocabulary entry) term is clamped from above at tau
            before the vocabulary sum, with zero gradient where clamped; negative terms are not clipped.
            Dense kinds and top-k buckets; not used by "sampled_token".
        loss_mask: `[...]`, nonzero = position counts; loss and gradient are 0 elsewhere.
        tp_group: the tensor-parallel group over which the vocabulary is sharded; None = the default group if
            torch.distributed is initialised, else a single rank.
        top_k: number of teacher entries for kind="top_k" / "top_k_renorm".
        target_ids: `[...]` global token ids for kind="sampled_token" (ignored where loss_mask is 0).
        vocab_size: real global vocabulary size; padded entries (global id >= vocab_size) are ignored.
        vocab_start_index: global id of this shard's first entry (default rank * v_local).
    Returns:
        `[...]` fp32 per-position loss, identical on every TP rank, 0 where masked.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [..., vocab/tp]."
        )
    positions = student_logits.shape[:-1]
    validate_args(
        kind=kind, beta=beta, temperature=temperature, clip=clip, top_k=top_k, target_ids=target_ids,
        loss_mask=loss_mask, positions_shape=positions, local_vocab=student_logits.shape[-1],
    )  # fmt: skip
    beta = 0.0 if beta is None else float(beta)
    group = resolve_group(tp_group)
    start, n_valid = shard_layout(student_logits.shape[-1], group, vocab_size, vocab_start_index)
    mask = None if loss_mask is None else (loss_mask.reshape(-1) != 0).float()  # (N,)
    clip = None if clip is None else float(clip)
    kind = effective_dense_kind(kind, float(beta))
    if kind in DENSE_KINDS:
        return _VocabParallelDenseDivergence.apply(
            student_logits, teacher_logits, mask, kind, float(beta), float(temperature), clip, n_valid, group
        )
    if kind in TOP_K_KINDS:
        loss = topk_divergence(
            student_logits, teacher_logits, k=int(top_k), temperature=float(temperature), clip=clip,
            start=start, n_valid=n_valid, group=group, tail=kind == "top_k", beta=float(beta),
        )  # fmt: skip
    else:
        ids = target_ids.reshape(-1)
        if mask is not None:
            ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # masked ids may be -100 etc.
        loss = sampled_token_divergence(
            student_logits, teacher_logits, ids, temperature=float(temperature), start=start,
            n_valid=n_valid, group=group,
        )  # fmt: skip
    if mask is not None:
        loss = loss * mask
    return loss.reshape(positions)
