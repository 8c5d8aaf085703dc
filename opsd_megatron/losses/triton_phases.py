"""Triton kernels for the three phases of `_phases.py` (dense divergences on a logits chunk, CUDA).

One program per row; each loops over the row's vocabulary shard in blocks of `BLOCK` entries, reading the raw
logits in their own dtype (bf16 / fp16 / fp32) and doing all math in fp32 registers, so no fp32 `[c, v]`
tensor is ever written:

    stats_kernel       1 read of ls, lt   -> local (max, sum-exp) of student and teacher     `[2, 2, c]`
    terms_kernel       1 read of ls, lt   -> partial loss, sum_v m_v h_v (+ clipped count, H(p_S), H(p_T))
    grad_kernel        1 read, 1 write    -> dloss/dlogits = scale * inv_t * (m h - p_S sum m h) into `out`
    terms_grad_kernel  2 reads, 1 write   -> single rank: terms, then (row still in L2) the gradient

Kinds (constexpr KIND): 0 forward KL, 1 reverse KL, 2 JSD(beta); pointwise clip when HAS_CLIP
(m_v = f_v < clip). Entries past `v` (the block tail) are masked. Import only where Triton is installed
(`_phases` does so lazily). `TRITON_INTERPRET=1` set before the first import runs the kernels on CPU
tensors: the CI tests do that in a subprocess (tests/triton_interp_check.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 2048


@triton.jit
def _terms(xs, xt, lse_s, lse_t, inv_t, lb, l1, beta, clip, KIND: tl.constexpr, HAS_CLIP: tl.constexpr):
    """f (clipped), m h, and log p_S, p_S, log p_T, p_T of one block (fp32)."""
    lps = xs * inv_t - lse_s
    lpt = xt * inv_t - lse_t
    ps = tl.exp(lps)
    pt = tl.exp(lpt)
    if KIND == 0:
        f = pt * (lpt - lps)
        h = -pt
    elif KIND == 1:
        d = lps - lpt
        f = ps * d
        h = ps * (d + 1.0)
    else:
        a = lpt + lb
        b = lps + l1
        mx = tl.maximum(a, b)
        log_m = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
        h = (1.0 - beta) * ps * (lps - log_m)
        f = beta * pt * (lpt - log_m) + h
    if HAS_CLIP:
        keep = f < clip
        f = tl.minimum(f, clip)
        h = tl.where(keep, h, 0.0)
    return f, h, lps, ps, lpt, pt


@triton.jit
def _block_terms(
    ls_ptr, lt_ptr, row, stride, start, v, lse_s, lse_t, inv_t, lb, l1, beta, clip,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The `[BLOCK]` entries of `row` from `start`: offsets, in-range mask, and their `_terms` (fp32)."""
    offs = start + tl.arange(0, BLOCK)
    msk = offs < v
    xs = tl.load(ls_ptr + row * stride + offs, mask=msk, other=0.0).to(tl.float32)
    xt = tl.load(lt_ptr + row * stride + offs, mask=msk, other=0.0).to(tl.float32)
    f, h, lps, ps, lpt, pt = _terms(xs, xt, lse_s, lse_t, inv_t, lb, l1, beta, clip, KIND, HAS_CLIP)
    return offs, msk, f, h, lps, ps, lpt, pt


@triton.jit
def stats_kernel(ls_ptr, lt_ptr, out_ptr, c, v, stride, inv_t, BLOCK: tl.constexpr):
    """out `[2, 2, c]` fp32: (max, sum exp(z - max)) of z = logits * inv_t, student then teacher."""
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 on big chunks
    m_s = tl.full([BLOCK], -float("inf"), tl.float32)  # per-lane running max and sum-exp
    m_t = tl.full([BLOCK], -float("inf"), tl.float32)
    s_s = tl.zeros([BLOCK], dtype=tl.float32)
    s_t = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, v, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        msk = offs < v
        zs = tl.load(ls_ptr + row * stride + offs, mask=msk, other=-float("inf")).to(tl.float32) * inv_t
        zt = tl.load(lt_ptr + row * stride + offs, mask=msk, other=-float("inf")).to(tl.float32) * inv_t
        nm_s = tl.maximum(m_s, zs)
        nm_t = tl.maximum(m_t, zt)
        fin_s = nm_s > -float("inf")  # lanes that have seen a real entry
        fin_t = nm_t > -float("inf")
        s_s = tl.where(fin_s, s_s * tl.exp(m_s - nm_s) + tl.exp(zs - nm_s), 0.0)
        s_t = tl.where(fin_t, s_t * tl.exp(m_t - nm_t) + tl.exp(zt - nm_t), 0.0)
        m_s = nm_s
        m_t = nm_t
    ms = tl.max(m_s, 0)
    mt = tl.max(m_t, 0)
    tl.store(out_ptr + row, ms)
    tl.store(out_ptr + c + row, tl.sum(tl.where(m_s > -float("inf"), s_s * tl.exp(m_s - ms), 0.0), 0))
    tl.store(out_ptr + 2 * c + row, mt)
    tl.store(out_ptr + 3 * c + row, tl.sum(tl.where(m_t > -float("inf"), s_t * tl.exp(m_t - mt), 0.0), 0))


@triton.jit
def terms_kernel(
    ls_ptr, lt_ptr, shift_ptr, out_ptr, c, v, stride, inv_t, lb, l1, beta, clip,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr, EXTRA: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out `[2 or 5, c]` fp32: this shard's sums of f and m h (+ clipped count, H(p_S), H(p_T) terms)."""
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 on big chunks
    lse_s = tl.load(shift_ptr + row)
    lse_t = tl.load(shift_ptr + c + row)
    acc_f = tl.zeros([BLOCK], dtype=tl.float32)
    acc_h = tl.zeros([BLOCK], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_es = tl.zeros([BLOCK], dtype=tl.float32)
    acc_et = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, v, BLOCK):
        offs, msk, f, h, lps, ps, lpt, pt = _block_terms(
            ls_ptr, lt_ptr, row, stride, start, v, lse_s, lse_t, inv_t, lb, l1, beta, clip,
            KIND, HAS_CLIP, BLOCK,
        )  # fmt: skip
        acc_f += tl.where(msk, f, 0.0)
        acc_h += tl.where(msk, h, 0.0)
        if EXTRA:
            if HAS_CLIP:
                acc_k += tl.where(msk & (f >= clip), 1.0, 0.0)
            acc_es += tl.where(msk, -ps * lps, 0.0)
            acc_et += tl.where(msk, -pt * lpt, 0.0)
    tl.store(out_ptr + row, tl.sum(acc_f, 0))
    tl.store(out_ptr + c + row, tl.sum(acc_h, 0))
    if EXTRA:
        tl.store(out_ptr + 2 * c + row, tl.sum(acc_k, 0))
        tl.store(out_ptr + 3 * c + row, tl.sum(acc_es, 0))
        tl.store(out_ptr + 4 * c + row, tl.sum(acc_et, 0))


@triton.jit
def grad_kernel(
    ls_ptr, lt_ptr, saved_ptr, scale_ptr, out_ptr, c, v, stride, out_stride, inv_t, lb, l1, beta,
    clip, KIND: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[row] = scale[row] * inv_t * (m h - p_S * saved[2, row]), in out's dtype (may alias ls)."""
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 on big chunks
    lse_s = tl.load(saved_ptr + row)
    lse_t = tl.load(saved_ptr + c + row)
    smh = tl.load(saved_ptr + 2 * c + row)
    sc = tl.load(scale_ptr + row) * inv_t
    for start in range(0, v, BLOCK):
        offs, msk, f, h, lps, ps, lpt, pt = _block_terms(
            ls_ptr, lt_ptr, row, stride, start, v, lse_s, lse_t, inv_t, lb, l1, beta, clip,
            KIND, HAS_CLIP, BLOCK,
        )  # fmt: skip
        g = (h - ps * smh) * sc
        tl.store(out_ptr + row * out_stride + offs, g.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def terms_grad_kernel(
    ls_ptr, lt_ptr, shift_ptr, out_ptr, c, v, stride, inv_t, lb, l1, beta, clip,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Single rank: out `[2, c]` = (sum f, sum m h) as terms_kernel, then the gradient (scale 1) into ls."""
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 on big chunks
    lse_s = tl.load(shift_ptr + row)
    lse_t = tl.load(shift_ptr + c + row)
    acc_f = tl.zeros([BLOCK], dtype=tl.float32)
    acc_h = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, v, BLOCK):
        offs, msk, f, h, lps, ps, lpt, pt = _block_terms(
            ls_ptr, lt_ptr, row, stride, start, v, lse_s, lse_t, inv_t, lb, l1, beta, clip,
            KIND, HAS_CLIP, BLOCK,
        )  # fmt: skip
        acc_f += tl.where(msk, f, 0.0)
        acc_h += tl.where(msk, h, 0.0)
    smh = tl.sum(acc_h, 0)
    tl.store(out_ptr + row, tl.sum(acc_f, 0))
    tl.store(out_ptr + c + row, smh)
    for start in range(0, v, BLOCK):
        offs, msk, f, h, lps, ps, lpt, pt = _block_terms(
            ls_ptr, lt_ptr, row, stride, start, v, lse_s, lse_t, inv_t, lb, l1, beta, clip,
            KIND, HAS_CLIP, BLOCK,
        )  # fmt: skip
        g = (h - ps * smh) * inv_t
        tl.store(ls_ptr + row * stride + offs, g.to(ls_ptr.dtype.element_ty), mask=msk)


def supported(ls: torch.Tensor, lt: torch.Tensor, kind: str) -> str | None:
    """None when the kernels take these chunks, else why not (the caller falls back to the torch phases)."""
    if kind not in KIND_IDS:
        return f"kind {kind!r}"
    for name, x in (("student", ls), ("teacher", lt)):
        if x.dtype not in DTYPES:
            return f"{name} logits dtype {x.dtype} (supported: {DTYPES})"
        if x.dim() != 2 or x.stride(-1) != 1:
            return (
                f"{name} logits must be 2-D with unit stride along the vocabulary, got strides {x.stride()}"
            )
    if ls.shape != lt.shape or ls.stride() != lt.stride():
        return f"student {tuple(ls.shape)}/{ls.stride()} and teacher {tuple(lt.shape)}/{lt.stride()} differ"
    return None


def _consts(kind: str, beta: float, clip):
    lb = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    l1 = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    return dict(lb=lb, l1=l1, beta=float(beta), clip=0.0 if clip is None else float(clip))


def stats(ls, lt, inv_t: float) -> torch.Tensor:
    c, v = ls.shape
    out = torch.empty((2, 2, c), dtype=torch.float32, device=ls.device)
    stats_kernel[(c,)](ls, lt, out, c, v, ls.stride(0), inv_t, BLOCK=BLOCK)
    return out


def terms(ls, lt, shift, inv_t: float, kind: str, beta: float, clip, extra: bool) -> torch.Tensor:
    c, v = ls.shape
    out = torch.empty((5 if extra else 2, c), dtype=torch.float32, device=ls.device)
    terms_kernel[(c,)](
        ls, lt, shift.float().contiguous(), out, c, v, ls.stride(0), inv_t, **_consts(kind, beta, clip),
        KIND=KIND_IDS[kind], HAS_CLIP=clip is not None, EXTRA=extra, BLOCK=BLOCK,
    )  # fmt: skip
    if extra and clip is None:
        out[2] = 0.0
    return out


def grad_(ls, lt, saved, scale, inv_t: float, kind: str, beta: float, clip, out) -> None:
    c, v = ls.shape
    grad_kernel[(c,)](
        ls, lt, saved.float().contiguous(), scale.float().contiguous(), out, c, v, ls.stride(0),
        out.stride(0), inv_t, **_consts(kind, beta, clip), KIND=KIND_IDS[kind], HAS_CLIP=clip is not None,
        BLOCK=BLOCK,
    )  # fmt: skip


def terms_grad_(ls, lt, shift, inv_t: float, kind: str, beta: float, clip) -> torch.Tensor:
    c, v = ls.shape
    out = torch.empty((2, c), dtype=torch.float32, device=ls.device)
    terms_grad_kernel[(c,)](
        ls, lt, shift.float().contiguous(), out, c, v, ls.stride(0), inv_t, **_consts(kind, beta, clip),
        KIND=KIND_IDS[kind], HAS_CLIP=clip is not None, BLOCK=BLOCK,
    )  # fmt: skip
    return out
