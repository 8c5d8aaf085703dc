"""CPU, single rank: the dense divergence of one logits chunk, processed a few rows at a time so that every
temporary stays in cache and no fp32 `[chunk, v]` copy of the logits is made.

The fused LM-head path on CPU computes the logit chunks `[c, v]` with large GEMMs (c ~ 32 MiB / (4 v) rows,
which keeps the GEMMs at full speed) and then walks the chunk in row blocks of `ROWS` rows: each block's
softmax statistics, loss and logit gradient are computed while its `[ROWS, v]` rows are hot in L2/L3, and the
gradient overwrites the student rows in place (no extra `[c, v]` buffer). Forward KL (the default loss;
fp32 math on fp32 logits or on fp32 copies of a bf16/fp16 block) has a hand-scheduled path: 2 exponentials
per entry and ~24 in-place passes over a `[ROWS, v]` block (3 more for the extra statistics); the other
kinds and dtypes go through the generic phases of `_phase_math.py` on each block.

No collective: with several TP ranks the softmax statistics of a chunk must be combined across ranks before
the loss, so `_phases.dense_chunk` handles those (whole-chunk phases with their collectives).
"""

from __future__ import annotations

import contextlib

import torch

from opsd_megatron.losses._phase_math import phase_grad_, phase_stats, phase_terms

ROWS = 16  # rows per block: [16, 32768] fp32 = 2 MiB per temporary


def _fkl_block_(s, t, inv_t: float, clip, loss, saved, work, ex=None) -> None:
    """Forward KL on one row block, in place. s, t: raw student / teacher logits `[r, v]` fp32 (owned; s is
    overwritten with dloss/dlogits, t with scratch); loss `[r]`, saved `[3, r]`, ex `[3, r]` or None (clipped
    count, H(p_S), H(p_T)) are outputs; work: 2 `[r, v]` fp32 buffers and one bool `[r, v]` buffer."""
    a, b, k = work
    s.mul_(inv_t)
    t.mul_(inv_t)
    m_s = s.amax(1, keepdim=True)  # (r, 1)
    m_t = t.amax(1, keepdim=True)
    s.sub_(m_s)
    t.sub_(m_t)
    torch.exp(t, out=a)
    se_t = a.sum(1, keepdim=True)  # (r, 1) sum-exp relative to m_t
    torch.exp(s, out=b)
    se_s = b.sum(1, keepdim=True)
    l_s, l_t = se_s.log(), se_t.log()
    a.div_(se_t)  # p_T
    if ex is not None:  # H = -sum p log p = lse - sum p z (z shifted by the row max, lse likewise)
        ex[1].copy_(l_s.squeeze(1) - torch.einsum("ij,ij->i", b, s) / se_s.squeeze(1))
        ex[2].copy_(l_t.squeeze(1) - torch.einsum("ij,ij->i", a, t))
    t.sub_(s).add_(l_s - l_t).mul_(a)  # f = p_T (log p_T - log p_S)
    if clip is not None:
        torch.ge(t, clip, out=k)  # clipped entries: no gradient
        loss.copy_(t.clamp_(max=clip).sum(1))
        a.masked_fill_(k, 0.0)
        if ex is not None:
            ex[0].copy_(k.sum(1))
    else:
        loss.copy_(t.sum(1))
        if ex is not None:
            ex[0].zero_()
    smh = a.sum(1, keepdim=True)  # sum_v m_v p_T(v) = -sum_v m_v h_v
    # dloss/dz_S = m h - p_S sum m h = p_S * smh - m p_T; times 1/T for the logits
    b.mul_(smh * inv_t / se_s)
    torch.sub(b, a, alpha=inv_t, out=s)
    saved[0].copy_((m_s + l_s).squeeze(1))
    saved[1].copy_((m_t + l_t).squeeze(1))
    saved[2].copy_(smh.squeeze(1).neg())


@contextlib.contextmanager
def one_thread():
    """Run the row-block math on one intra-op thread: a `[ROWS, v]` op takes ~0.1 ms on one core, but an
    OpenMP team whose second thread is descheduled (a shared machine) waits ~5 ms at every op's barrier."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def dense_chunk_rows_(ls, lt, *, kind, beta, temperature, clip, need_grad, extra=False):
    """Loss `[c]`, grad (written into `ls` `[c, v]`, or None), saved `[3, c]`, extra stats `[3, c]` or None,
    for one rank holding the whole vocabulary; the same results as `_phases.dense_chunk` with no group.

    ls, lt: raw student / teacher logit chunks `[c, v]` (owned: both are overwritten).
    """

    c, v = ls.shape
    inv_t = 1.0 / temperature
    acc = torch.promote_types(ls.dtype, torch.float32)
    loss = ls.new_empty(c, dtype=acc)
    saved = ls.new_empty((3, c), dtype=acc)
    ex = ls.new_empty((3, c), dtype=acc) if extra else None
    low = (torch.bfloat16, torch.float16)
    fast = kind == "forward_kl" and ls.dtype in (torch.float32, *low) and lt.dtype == ls.dtype
    work = None
    if fast:
        r = min(ROWS, c)
        f32 = dict(dtype=torch.float32)
        work = (
            ls.new_empty((r, v), **f32),
            ls.new_empty((r, v), **f32),
            ls.new_empty((r, v), dtype=torch.bool),
        )
        if ls.dtype in low:  # fp32 copies of the block's logits (the gradient is written back in ls's dtype)
            work += (ls.new_empty((r, v), **f32), ls.new_empty((r, v), **f32))
    with one_thread():
        _rows_loop(ls, lt, kind, beta, inv_t, clip, need_grad, extra, fast, loss, saved, ex, work)
    return loss, (ls if need_grad else None), saved, ex


def _rows_loop(ls, lt, kind, beta, inv_t, clip, need_grad, extra, fast, loss, saved, ex, work) -> None:
    c = ls.shape[0]
    for a in range(0, c, ROWS):
        b = min(a + ROWS, c)
        s, t = ls[a:b], lt[a:b]
        if fast:
            n = b - a
            e = ex[:, a:b] if extra else None
            w = tuple(x[:n] for x in work)
            if len(w) == 5:  # bf16 / fp16 logits: the math on fp32 copies of this block
                w[3].copy_(s)
                w[4].copy_(t)
                _fkl_block_(w[3], w[4], inv_t, clip, loss[a:b], saved[:, a:b], w[:3], e)
                s.copy_(w[3])
            else:
                _fkl_block_(s, t, inv_t, clip, loss[a:b], saved[:, a:b], w, e)
            continue
        st = phase_stats(s, t, inv_t)  # (2, 2, r)
        shift = st[:, 0] + torch.log(st[:, 1])  # (2, r)
        parts = phase_terms(s, t, shift, inv_t, kind, beta, clip, extra)  # (k, r)
        loss[a:b] = parts[0]
        saved[:2, a:b] = shift
        saved[2, a:b] = parts[1]
        if extra:
            ex[:, a:b] = parts[2:]
        if need_grad:
            ones = torch.ones(b - a, dtype=saved.dtype)
            phase_grad_(s, t, saved[:, a:b], ones, inv_t, kind, beta, clip, s)


def grad_rows_(ls, lt, saved, scale, *, kind, beta, temperature, clip, out) -> None:
    """`_phase_math.phase_grad_` over row blocks (CPU): dloss/dlogits `[c, v]` weighted by `scale` `[c]`."""
    with one_thread():
        for a in range(0, ls.shape[0], ROWS):
            b = min(a + ROWS, ls.shape[0])
            phase_grad_(
                ls[a:b], lt[a:b], saved[:, a:b], scale[a:b], 1.0 / temperature, kind, beta, clip, out[a:b]
            )
