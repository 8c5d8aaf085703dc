"""Divergence fused with the (vocabulary-parallel) LM head: from hidden states and weight shards, chunked over
tokens so that no `[all tokens, vocab/tp]` fp32 tensor ever exists.

    from opsd_megatron.losses import fused_linear_divergence
    per_token = fused_linear_divergence(h_student, lm_head_shard, h_teacher, teacher_lm_head_shard,
                                        kind="forward_kl", temperature=1.1, clip=0.05, loss_mask=mask,
                                        tp_group=tp_group, vocab_size=151_936)

Dense kinds (forward_kl / reverse_kl / jsd), per chunk of `chunk_size` valid tokens: two GEMMs give the
student and teacher logit shards `[c, v/tp]` (input dtype, e.g. bf16), the divergence and its logit gradient
are computed in fp32 (collectives of `dense_forward`, forward only), and two more GEMMs turn that gradient
into d/d hidden `[c, H]` and d/d weight `[v/tp, H]`, which are kept (as Liger-Kernel: 4 GEMMs in all). The
two logit chunks live in two reused buffers; the elementwise phases (`_phases.py`) run as Triton kernels on
CUDA (`triton_phases.py`) and on cache-sized row blocks of one thread on CPU (`_rowblock.py`), and the
gradient overwrites the student chunk (no fp32 `[c, v]` copy).
Backward scales them by the incoming per-token gradient when it is the same for every valid token (token-mean
reductions, `token_mean`); otherwise (per-token weights) it recomputes the logits chunk by chunk from the
saved per-token log-sum-exps (6 GEMMs, still no collective). Masked tokens are skipped entirely.

Tensor parallelism: hidden states are replicated over the TP group and the weight is this rank's vocabulary
shard, so each rank's d/d hidden is a partial sum; with `reduce_hidden_grad=True` (default) the backward
all-reduces it over `tp_group` (the one backward collective, the job of Megatron's
`copy_to_tensor_model_parallel_region`); pass False if the caller's hidden states already go through that.

Step statistics (`with_stats=True`, `step_stats.py`): the clipped fraction and both entropies come from the
dense phases' extra sums of the same chunk, the drift log-probabilities from the student chunk before it is
overwritten by its gradient; no second pass over the vocabulary.

Sparse kinds (top_k / top_k_renorm / sampled_token) run `vocab_parallel_divergence` per chunk, recomputed in
backward (`_RecomputedSparseChunk`; their forward collectives rerun in backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.losses._math import (
    DENSE_KINDS,
    all_reduce,
    effective_dense_kind,
    group_size,
    resolve_group,
    shard_layout,
)
from opsd_megatron.losses._phases import agreed_chunk_size, dense_chunk, grad_from_saved_
from opsd_megatron.losses.step_stats import FusedStats, StatsCollector
from opsd_megatron.losses.vocab_parallel import validate_args, vocab_parallel_divergence


def _logits(hidden: torch.Tensor, weight: torch.Tensor, n_valid: int, out=None) -> torch.Tensor:
    """Logit shard `[c, n_valid]` = hidden `[c, H]` @ weight[:n_valid].T, in the input dtype (bf16 GEMM);
    `out`: a reused `[>= c, n_valid]` buffer (its first c rows are written and returned)."""
    if out is None:
        return hidden @ weight[:n_valid].t()
    return torch.matmul(hidden, weight[:n_valid].t(), out=out[: hidden.shape[0]])


class _FusedLinearDenseDivergence(torch.autograd.Function):
    """Dense divergence from hidden states and LM-head shards; see the module docstring for the algorithm."""

    @staticmethod
    def forward(
        ctx, hs, ws, ht, wt, mask, kind, beta, temperature, clip, n_valid, group, chunk, reduce_h, col
    ):
        rows = None if mask is None else mask.nonzero().squeeze(-1)  # (Nv,) valid token indices
        hs_v = (hs if rows is None else hs.index_select(0, rows)).detach()  # (Nv, H)
        ht_v = (ht if rows is None else ht.index_select(0, rows)).detach()  # (Nv, H)
        ws_d, wt_d = ws.detach(), wt.detach()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need = need_h or need_w
        n_tok = hs_v.shape[0]
        acc = torch.promote_types(hs.dtype, torch.float32)
        loss_v = hs.new_empty(n_tok, dtype=acc)
        gh_v = torch.empty_like(hs_v) if need_h else None  # (Nv, H)
        gw = torch.zeros_like(ws_d[:n_valid]) if need_w else None  # (n_valid, H)
        saved = hs.new_empty((3, n_tok), dtype=acc) if need else None
        # two reused logit buffers [chunk, v] (CPU: no page faults from fresh large allocations per chunk)
        bufs = [hs_v.new_empty((min(chunk, n_tok), n_valid)) for _ in range(2)]
        for a in range(0, n_tok, chunk):
            b = min(a + chunk, n_tok)
            ls_c = _logits(hs_v[a:b], ws_d, n_valid, bufs[0])
            lt_c = _logits(ht_v[a:b], wt_d, n_valid, bufs[1])
            if col is not None:  # step statistics (StatsCollector): read ls_c before it becomes the gradient
                col.token_logprobs(a, b, ls_c)
            loss_c, g, saved_c, extra_c = dense_chunk(
                ls_c, lt_c, kind=kind, beta=beta, temperature=temperature, clip=clip, group=group,
                need_grad=need, owned=True, extra=col is not None,
            )  # fmt: skip
            if col is not None:
                col.extra(a, b, extra_c)
            del ls_c, lt_c
            loss_v[a:b] = loss_c
            if need:
                saved[:, a:b] = saved_c
                if need_h:
                    torch.matmul(g, ws_d[:n_valid], out=gh_v[a:b])  # (c, H)
                if need_w:
                    gw.addmm_(g.t(), hs_v[a:b])  # (v, H)
            del loss_c, g, saved_c  # free this chunk's logits before the next chunk's GEMMs
        ctx.meta = (kind, beta, temperature, clip, n_valid, group, chunk, reduce_h, hs.shape, ws.shape)
        ctx.consumed = False
        if need:
            ctx.save_for_backward(rows, hs, ws, ht, wt, saved)
            ctx.grads = (gh_v, gw)  # plain attributes: backward scales them in place (no version check)
        loss = hs.new_zeros(hs.shape[0], dtype=acc)
        return loss.index_copy_(0, rows, loss_v) if rows is not None else loss_v

    @staticmethod
    def backward(ctx, grad_loss):
        rows, hs, ws, ht, wt, saved = ctx.saved_tensors
        gh_v, gw = ctx.grads
        kind, beta, temperature, clip, n_valid, group, chunk, reduce_h, h_shape, w_shape = ctx.meta
        go = grad_loss if rows is None else grad_loss.index_select(0, rows)  # (Nv,)
        uniform = go.numel() == 0 or bool((go == go[0]).all())
        if uniform and not ctx.consumed:  # the common token-mean case: scale what forward computed, in place
            ctx.consumed = True  # a second backward (retain_graph) takes the recompute path below
            c = go[0] if go.numel() else grad_loss.new_zeros(())
            gh_v = gh_v.mul_(c.to(gh_v.dtype)) if gh_v is not None else None
            gw = gw.mul_(c.to(gw.dtype)) if gw is not None else None
            ctx.grads = (None, None)
        else:  # general per-token weights: recompute the logit gradient chunk by chunk (no collective)
            hs_v = hs if rows is None else hs.index_select(0, rows)
            ht_v = ht if rows is None else ht.index_select(0, rows)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            gh_v = hs_v.new_empty(hs_v.shape) if need_h else None
            gw = ws.new_zeros((n_valid, ws.shape[1])) if need_w else None
            for a in range(0, go.shape[0], chunk):
                b = min(a + chunk, go.shape[0])
                g = grad_from_saved_(
                    _logits(hs_v[a:b], ws, n_valid), _logits(ht_v[a:b], wt, n_valid), saved[:, a:b],
                    go[a:b].to(saved.dtype), kind=kind, beta=beta, temperature=temperature, clip=clip,
                )  # fmt: skip
                if gh_v is not None:
                    torch.matmul(g, ws[:n_valid], out=gh_v[a:b])
                if gw is not None:
                    gw.addmm_(g.t(), hs_v[a:b])
                del g
        grad_h = grad_w = None
        if gh_v is not None:
            grad_h = gh_v if rows is None else gh_v.new_zeros(h_shape).index_copy_(0, rows, gh_v)
            if reduce_h:
                all_reduce(grad_h, dist.ReduceOp.SUM, group)
        if gw is not None:
            pad = w_shape[0] - n_valid
            grad_w = gw if pad == 0 else torch.nn.functional.pad(gw, (0, 0, 0, pad))
        return (grad_h, grad_w) + (None,) * 12


class _ReduceGradOverGroup(torch.autograd.Function):
    """Identity in forward; all-reduce SUM of the gradient over `group` in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), dist.ReduceOp.SUM, ctx.group), None


def _sparse_chunk(hs_c, ws, ht_c, wt, mask_c, ids_c, kw, col=None, a=0):
    ls = hs_c @ ws.t()  # (c, v)
    lt = ht_c.detach() @ wt.detach().t()  # (c, v)
    if col is not None:  # step statistics from this chunk's logits (forward only, no grad)
        with torch.no_grad():
            _sparse_stats(ls.detach(), lt, a, col, kw)
    return vocab_parallel_divergence(ls, lt, loss_mask=mask_c, target_ids=ids_c, **kw)


def _sparse_stats(ls, lt, a, col, kw) -> None:
    """Entropies (one dense statistics pass) and drift logprobs of a sparse-kind chunk `[c, v/tp]`."""
    b = a + ls.shape[0]
    n_valid = col.n_valid
    ls_v, lt_v = ls[:, :n_valid], lt[:, :n_valid]
    col.token_logprobs(a, b, ls_v)
    _, _, _, extra = dense_chunk(
        ls_v, lt_v, kind="forward_kl", beta=0.0, temperature=kw["temperature"], clip=None,
        group=kw["tp_group"], need_grad=False, extra=True,
    )  # fmt: skip
    extra[0].zero_()  # no pointwise clip statistic for the sparse estimators
    col.extra(a, b, extra)


class _RecomputedSparseChunk(torch.autograd.Function):
    """One chunk of a sparse-kind loss `[c]` kept without activations: backward reruns its forward (with
    its forward collectives) under autograd and back-propagates into the chunk's hidden and the weight."""

    @staticmethod
    def forward(ctx, hs_c, ws, ht_c, wt, mask_c, ids_c, kw, col=None, a=0):
        ctx.save_for_backward(hs_c, ws, ht_c, wt, mask_c, ids_c)
        ctx.kw = kw
        return _sparse_chunk(hs_c, ws, ht_c, wt, mask_c, ids_c, kw, col, a)

    @staticmethod
    def backward(ctx, grad_loss):
        hs_c, ws, ht_c, wt, mask_c, ids_c = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            h = hs_c.detach().requires_grad_(need_h)
            w = ws.detach().requires_grad_(need_w)
            loss = _sparse_chunk(h, w, ht_c, wt, mask_c, ids_c, ctx.kw)
            inputs = [x for x, n in ((h, need_h), (w, need_w)) if n]
            grads = iter(torch.autograd.grad(loss, inputs, grad_loss))
        return (next(grads) if need_h else None, next(grads) if need_w else None) + (None,) * 7


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
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
    chunk_size: int | None = None,
    reduce_hidden_grad: bool = True,
    with_stats: bool = False,
    sampling=None,
) -> torch.Tensor | tuple[torch.Tensor, FusedStats]:
    """Per-token divergence from hidden states `[T, H]` and LM-head weight shards `[v/tp, H]`.

    Same keywords and result as `vocab_parallel_divergence` on `hidden @ weight.T` (fp32 `[T]`, identical on
    every TP rank, 0 where `loss_mask` `[T]` is 0). Gradients reach `student_hidden` (all-reduced over the TP
    group when `reduce_hidden_grad`) and `student_weight` (this rank's shard); the teacher is a constant and
    `teacher_weight` may be the very same tensor as `student_weight`. `chunk_size` = tokens per chunk, the
    same on every TP rank (default: `agreed_chunk_size`, ~1 GB of bf16 logits per chunk on CUDA).

    `with_stats=True` returns `(loss, FusedStats)`: the step statistics (clipped fraction, student and
    teacher entropies, and with `sampling` (a `SamplingConfig`) and `target_ids` the sampled tokens'
    log-probabilities under the engine's sampling distribution), all `[T]`, computed in the same chunk loop
    from the same logits chunks (see `step_stats.py`). `target_ids` are then the sampled tokens for every
    kind (the sampled_token estimator uses them too).
    """
    if student_hidden.dim() != 2 or teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must both be [tokens, hidden] of the same shape."
        )
    if student_weight.shape != teacher_weight.shape or student_weight.shape[-1] != student_hidden.shape[-1]:
        raise ValueError(
            f"student_weight {tuple(student_weight.shape)} and teacher_weight {tuple(teacher_weight.shape)} "
            f"must both be [vocab/tp, {student_hidden.shape[-1]}] (the hidden size of the hidden states)."
        )
    positions = student_hidden.shape[:1]
    validate_args(
        kind=kind, beta=beta, temperature=temperature, clip=clip, top_k=top_k, target_ids=target_ids,
        loss_mask=loss_mask, positions_shape=positions, local_vocab=student_weight.shape[0],
    )  # fmt: skip
    beta = 0.0 if beta is None else float(beta)
    group = resolve_group(tp_group)
    start, n_valid = shard_layout(student_weight.shape[0], group, vocab_size, vocab_start_index)
    mask = None if loss_mask is None else loss_mask.reshape(-1) != 0  # (T,)
    if chunk_size:
        chunk = int(chunk_size)
    else:
        n_tok = int(mask.sum()) if mask is not None else student_hidden.shape[0]
        chunk = agreed_chunk_size(n_valid, n_tok, student_hidden.is_cuda, group)
    clip = None if clip is None else float(clip)
    dense_kind = effective_dense_kind(kind, float(beta))
    reduce_h = reduce_hidden_grad and group_size(group) > 1
    col = rows = None
    if with_stats:
        dense = dense_kind in DENSE_KINDS
        rows = mask.nonzero().squeeze(-1) if (dense and mask is not None) else None  # the dense loop's rows
        ids = None if target_ids is None else target_ids.reshape(-1)
        if ids is not None and rows is not None:
            ids = ids.index_select(0, rows)
        n_rows = student_hidden.shape[0] if rows is None else rows.shape[0]
        col = StatsCollector(n_rows, student_hidden.device, ids, sampling, start, group)
        col.n_valid = n_valid
    if dense_kind in DENSE_KINDS:
        loss = _FusedLinearDenseDivergence.apply(
            student_hidden, student_weight, teacher_hidden, teacher_weight, mask, dense_kind, float(beta),
            float(temperature), clip, n_valid, group, chunk, reduce_h, col,
        )  # fmt: skip
        return loss if col is None else (loss, _finish_stats(col, rows, mask, n_valid, group))
    hs = _ReduceGradOverGroup.apply(student_hidden, group) if reduce_h else student_hidden
    kw = dict(
        kind=kind, beta=beta, temperature=temperature, clip=clip, tp_group=group, top_k=top_k,
        vocab_size=vocab_size, vocab_start_index=start,
    )  # fmt: skip
    out = []
    for a in range(0, hs.shape[0], chunk):
        b = min(a + chunk, hs.shape[0])
        m_c = None if mask is None else mask[a:b]
        ids_c = None if target_ids is None else target_ids[a:b]
        args = (hs[a:b], student_weight, teacher_hidden[a:b], teacher_weight, m_c, ids_c, kw, col, a)
        out.append(_RecomputedSparseChunk.apply(*args))
    loss = torch.cat(out)
    return loss if col is None else (loss, _finish_stats(col, None, mask, n_valid, group))


def _finish_stats(col: StatsCollector, rows, mask, n_valid: int, group) -> FusedStats:
    """The collector's `[T]` statistics; the clipped count is divided by the global real vocabulary size
    (one all-reduce SUM of this shard's valid-entry count when TP > 1)."""
    v = torch.tensor(float(n_valid), dtype=torch.float64, device=col.parts.device)
    v_global = int(all_reduce(v, dist.ReduceOp.SUM, group).item())
    n_tokens = mask.shape[0] if mask is not None else col.parts.shape[1]
    return col.result(rows, n_tokens, mask, v_global)
