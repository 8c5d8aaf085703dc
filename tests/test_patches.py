"""The private-API patch registry (opsd_megatron.mcore.patches), the scoped CPU shim (cpu.megatron_on_cpu)
and the
supported-version check (opsd_megatron.mcore.versions)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsd_megatron.mcore import patches, versions

ROOT = Path(__file__).resolve().parents[1]


def test_registered_targets_exist_on_the_installed_stack():
    """Every torch / megatron-core target resolves (vLLM's are resolved when an engine starts)."""
    assert patches.check_all(libraries=("torch", "megatron-core")) == []
    assert {p.used_by for p in patches.PATCHES.values()} >= {
        "opsd_megatron.mcore.cpu",
        "opsd_megatron.run.checkpointing",
        "opsd_megatron.rollout.vllm_engine",
    }


def test_moved_target_is_loud(monkeypatch, caplog):
    optional = patches.Patch("test.optional", "json:no_such_helper", "megatron-core", "0.16.1", "tests", "x",
                             required=False)  # fmt: skip
    required = patches.Patch("test.required", "json.no_such_module:f", "torch", "2.13.0", "tests", "y")
    monkeypatch.setitem(patches.PATCHES, optional.name, optional)
    monkeypatch.setitem(patches.PATCHES, required.name, required)
    monkeypatch.setattr(patches, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="opsd_megatron.mcore.patches"):
        assert patches.target("test.optional") is None
        assert patches.target("test.optional") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings  # once per patch, not per call
    assert "json:no_such_helper" in warnings[0] and "written for megatron-core 0.16.1" in warnings[0]
    assert f"installed {versions.installed('megatron-core')}" in warnings[0]
    moved = r"json\.no_such_module:f .*written for torch 2\.13\.0"
    with pytest.raises(patches.PatchTargetMissing, match=moved):
        patches.target("test.required")
    assert {p.name for p, _ in patches.check_all(libraries=("megatron-core", "torch"))} >= {
        "test.optional",
        "test.required",
    }


_SCOPE_SCRIPT = """
import torch
from megatron.core.optimizer import clip_grads
from megatron.core.tensor_parallel import random as mrandom
from opsd_megatron.mcore import cpu

def state():
    return (torch.cuda.current_device, torch.cuda.synchronize, mrandom.CudaRNGStatesTracker,
            mrandom._CUDA_RNG_STATE_TRACKER, clip_grads.clip_grad_by_total_norm_fp32)

before = state()
with cpu.megatron_on_cpu() as active:
    assert active and torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"
    assert mrandom.CudaRNGStatesTracker is cpu.CpuRNGStatesTracker
    with cpu.megatron_on_cpu():
        pass
    assert torch.zeros(1).cuda().device.type == "cpu", "a nested block must not end the outer one"
assert state() == before, "torch.cuda / Megatron attributes not restored"
try:
    torch.empty(2, device="cuda")
    raise SystemExit("a CUDA tensor was created outside the block on a machine without CUDA")
except (RuntimeError, AssertionError):
    pass
with cpu.megatron_on_cpu():
    cpu.install()  # process-wide from here on: leaving the block keeps the patches
assert torch.empty(1, device="cuda").device.type == "cpu" and state() != before
print("OK")
"""


def test_cpu_shim_is_scoped():
    """In a fresh process (this one may already hold the process-wide shim of parallel.initialize)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU shim is inert with CUDA")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _SCOPE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


def test_declared_ranges_match_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the CI stack)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["gpu"])
    for name in ("vllm", "megatron-core", "torch", "transformers"):
        assert versions.requirement(name) in declared, (name, sorted(declared))


def test_version_check(caplog):
    assert versions.check_versions(vllm=True) == []  # the CI stack is the tested one
    with pytest.raises(versions.VersionError) as e:
        versions.check_versions(vllm=True, versions={"vllm": "0.11.0", "megatron-core": "0.20.1"})
    msg = str(e.value)
    assert "vllm 0.11.0 (need vllm>=0.32,<0.34)" in msg and "megatron-core 0.20.1 (need" in msg
    with pytest.raises(versions.VersionError, match="transformers is not installed"):
        versions.check_versions(versions={"transformers": None})
    with caplog.at_level(logging.WARNING, logger="opsd_megatron.mcore.versions"):
        untested = versions.check_versions(vllm=True, versions={"vllm": "0.33.1", "megatron-core": "0.19.0"})
    assert untested == ["megatron-core 0.19.0 (tested: 0.16.1, 0.19.2)", "vllm 0.33.1 (tested: 0.32.0)"]
    assert "untested" in caplog.text
    versions.check_versions(versions={"torch": "2.13.0+cpu"})  # local version labels are fine
