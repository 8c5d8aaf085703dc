"""The dense divergence of one chunk of logits in three fusable phases, for the fused LM-head path: dispatch
and collectives (the phase math itself is `_phase_math.py`).

Each phase reads the raw logit shards `[c, v]` (input dtype, e.g. bf16) and recomputes log p from per-row
scalars. On CUDA each phase is a hand-written Triton kernel (`triton_phases.py`; OPSD_LOSS_TRITON=0 disables),
else a `torch.compile` of the function below (OPSD_LOSS_COMPILE=0 disables), else the function itself; a
variant that raises is logged with its exception and skipped for that shape only, out-of-memory is re-raised
(`_run`). On CPU the functions run eagerly, for a single rank on cache-sized row blocks (`_rowblock.py`).

    phase_stats  -> local (max, sum-exp) of student and teacher     `[2, 2, c]`
    (collective: one all-gather of those, combined into the global log-sum-exps `shift` `[2, c]`)
    phase_terms  -> partial loss and sum_v m_v h_v (+ metrics)      `[k, c]`
    (collective: one all-reduce SUM of those)
    phase_grad_  -> dloss/dlogits for the student shard, written into its logits `[c, v]` (GEMM dtype)
Backward needs no collective: `saved` = (shift_s, shift_t, sum m h) `[3, c]` is enough to rerun phase_grad.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
import torch.distributed as dist

from opsd_megatron.losses._math import all_reduce, group_size
from opsd_megatron.losses._phase_math import phase_grad_, phase_stats, phase_terms, phase_terms_grad_
from opsd_megatron.losses._rowblock import dense_chunk_rows_, grad_rows_

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 25  # CPU default chunk: ~32 MiB per fp32 [c, v/tp] logits buffer (2 of them)


def default_chunk_size(local_vocab: int, n_tokens: int, cuda: bool) -> int:
    """Tokens per chunk: on CUDA the student + teacher logit chunks `[c, v/tp]` (bf16) take ~1 GB, which
    keeps the weight-gradient GEMM (inner dimension c) efficient; on CPU each fp32 `[c, v/tp]` logits buffer
    takes ~32 MiB (full-speed GEMMs; the elementwise math then runs on cache-sized row blocks, `_rowblock`).
    Chunks are then evened out over the tokens (at least 64 tokens each)."""
    budget = (1 << 30) // 4 if cuda else _CHUNK_BYTES // 4  # elements per [c, v] buffer
    c = max(64, budget // max(local_vocab, 1))
    n_chunks = max(1, -(-n_tokens // c))
    return max(1, -(-n_tokens // n_chunks))


def agreed_chunk_size(local_vocab: int, n_tokens: int, cuda: bool, group) -> int:
    """`default_chunk_size`, made equal on every rank of `group` (shards may differ in size, and every chunk
    runs the same collectives): one all-reduce MIN of one number when the group has several ranks."""
    c = default_chunk_size(local_vocab, n_tokens, cuda)
    if group_size(group) > 1:
        t = torch.tensor([c], dtype=torch.int64, device="cuda" if cuda else "cpu")
        c = int(all_reduce(t, dist.ReduceOp.MIN, group).item())
    return c


_COMPILED: dict = {}  # phase function -> torch.compile(phase)
_FAILED: set = set()  # (variant, phase, kind, shard width, dtypes): that variant raised once; not used again
_SAID: set = set()  # messages logged once


def _log_once(msg: str, *args) -> None:
    if (msg, args) not in _SAID:
        _SAID.add((msg, args))
        logger.warning(msg, *args)


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_compile(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("OPSD_LOSS_COMPILE", "1") != "0" and _have_triton()


def _triton_kernels(ls: torch.Tensor, lt: torch.Tensor, kind: str):
    """The `triton_phases` module when its kernels take these chunks, else None (the reason logged once).
    Used on CUDA unless OPSD_LOSS_TRITON=0; on CPU only with OPSD_LOSS_TRITON=interpret (and
    TRITON_INTERPRET=1 set before Triton was first imported: the CI tests of the kernels)."""
    mode = os.environ.get("OPSD_LOSS_TRITON", "1")
    if mode == "0" or (not ls.is_cuda and mode != "interpret"):
        return None
    if not _have_triton():
        _log_once("Triton is not installed: the loss phases use torch.compile / eager PyTorch instead.")
        return None
    from opsd_megatron.losses import triton_phases  # optional: imports triton

    why = triton_phases.supported(ls, lt, kind)
    if why is not None:
        _log_once("Triton loss kernels do not take %s; using the torch phases for it.", why)
        return None
    return triton_phases


_KERNEL_NAMES = {"phase_stats": "stats", "phase_terms": "terms", "phase_grad_": "grad_"}
_KERNEL_NAMES["phase_terms_grad_"] = "terms_grad_"


def _run(fn, kind: str, ls: torch.Tensor, lt: torch.Tensor, *args):
    """Run phase `fn(ls, lt, *args)`: as a Triton kernel when it takes the chunks, else (CUDA) through a
    cached `torch.compile(fn)`, else eagerly. A failing kernel or compilation is logged with its exception
    and that variant is not used again for this (phase, kind, shard width, dtypes); out-of-memory is
    re-raised."""
    key = (fn.__name__, kind, tuple(ls.shape[1:]), ls.dtype, lt.dtype, ls.device.type)
    variants = []
    if ("triton", *key) not in _FAILED:
        tk = _triton_kernels(ls, lt, kind)
        if tk is not None:
            variants.append(("triton", getattr(tk, _KERNEL_NAMES[fn.__name__])))
    if _use_compile(ls) and ("compile", *key) not in _FAILED:
        variants.append(("compile", _compiled(fn)))
    for name, impl in variants:
        try:
            return impl(ls, lt, *args)
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - any kernel / compiler failure: the next variant is exact
            logger.exception(
                "%s variant of %s failed for %s; falling back for this shape.", name, fn.__name__, key
            )
            _FAILED.add((name, *key))
    return fn(ls, lt, *args)


def _compiled(fn):
    if fn not in _COMPILED:
        import torch._dynamo  # heavy (the compiler stack): only when compiling, on CUDA

        # one graph per (kind, clip on/off, dtype, ...) combination: allow more than the default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)  # chunk rows become dynamic on a 2nd size
    return _COMPILED[fn]


def compiled_status() -> dict:
    """Which fast variants failed so far (for benchmark output): {'failed': [...], 'compiled': [...]}."""
    return {"failed": sorted(str(k) for k in _FAILED), "compiled": sorted(f.__name__ for f in _COMPILED)}


def global_shift(stats: torch.Tensor, group) -> torch.Tensor:
    """Global log-sum-exp `[2, c]` from local (max, sum-exp) `[2, 2, c]`; one all-gather when TP > 1."""
    if group_size(group) > 1:
        parts = [torch.empty_like(stats) for _ in range(group_size(group))]
        dist.all_gather(parts, stats.contiguous(), group=group)
        allst = torch.stack(parts)  # (tp, 2, 2, c)
        m = allst[:, :, 0].amax(0)  # (2, c)
        se = (allst[:, :, 1] * torch.exp(allst[:, :, 0] - m)).sum(0)  # (2, c); empty shard: 0 * exp(-inf)
        return m + torch.log(se)
    return stats[:, 0] + torch.log(stats[:, 1])


def dense_chunk(ls, lt, *, kind, beta, temperature, clip, group, need_grad, extra=False, owned=False):
    """Loss `[c]`, grad `[c, v]` (written into `ls`, or None), saved `[3, c]`, extra stats `[3, c]` or None.

    ls, lt: this rank's student / teacher logit shards `[c, v]` (valid entries only, any float dtype); `ls` is
    owned (a fresh GEMM output) and is overwritten by the gradient when need_grad; `owned=True`: `lt` too may
    be overwritten, which lets a single CPU rank use the cache-blocked `_rowblock` path.
    Collectives: all-gather `[2, 2, c]` + all-reduce SUM `[k, c]` (none when the group has one rank).
    """
    inv_t = 1.0 / temperature
    c = ls.shape[0]
    cpu_rows = not ls.is_cuda and _triton_kernels(ls, lt, kind) is None
    if owned and cpu_rows and group_size(group) == 1 and ls.shape[-1] > 0:
        return dense_chunk_rows_(
            ls, lt, kind=kind, beta=beta, temperature=temperature, clip=clip, need_grad=need_grad, extra=extra
        )
    if ls.shape[-1] > 0:
        stats = _run(phase_stats, kind, ls, lt, inv_t)
    else:  # an all-padding shard
        stats = torch.stack([torch.full((c,), -torch.inf), torch.zeros(c)]).to(ls.device).expand(2, 2, c)
    shift = global_shift(stats, group)  # (2, c)
    # single rank: one fused call (no collective to wait for); not for JSD through torch.compile, whose
    # shared log M Inductor materialises as an fp32 [c, v] buffer when the phases are merged (4.0 vs 2.15 GiB)
    jsd_ok = kind != "jsd" or _triton_kernels(ls, lt, kind) is not None
    if need_grad and not extra and group_size(group) == 1 and jsd_ok:
        parts = _run(phase_terms_grad_, kind, ls, lt, shift, inv_t, kind, beta, clip)  # (2, c), ls <- grad
        return parts[0], ls, torch.cat([shift, parts[1:2]]), None
    if ls.shape[-1] > 0:
        parts = _run(phase_terms, kind, ls, lt, shift, inv_t, kind, beta, clip, extra)
    else:
        parts = shift.new_zeros((5 if extra else 2, c))
    red = all_reduce(parts, dist.ReduceOp.SUM, group)  # (k, c)
    saved = torch.cat([shift, red[1:2]])  # (3, c)
    grad = None
    if need_grad:
        ones = torch.ones(c, device=ls.device, dtype=shift.dtype)
        grad = grad_from_saved_(ls, lt, saved, ones, kind=kind, beta=beta, temperature=temperature, clip=clip)
    return red[0], grad, saved, (red[2:] if extra else None)


def grad_from_saved_(ls, lt, saved, scale, *, kind, beta, temperature, clip, out=None) -> torch.Tensor:
    """dloss/dlogits `[c, v]` weighted per row by `scale` `[c]`, from `saved` `[3, c]`, written into `out`
    (default: into `ls`, which must then be owned, e.g. a fresh GEMM output) and returned; no collective."""
    out = ls if out is None else out
    if ls.shape[-1] > 0 and not ls.is_cuda and _triton_kernels(ls, lt, kind) is None:
        grad_rows_(ls, lt, saved, scale, kind=kind, beta=beta, temperature=temperature, clip=clip, out=out)
    elif ls.shape[-1] > 0:
        _run(phase_grad_, kind, ls, lt, saved, scale, 1.0 / temperature, kind, beta, clip, out)
    return out
