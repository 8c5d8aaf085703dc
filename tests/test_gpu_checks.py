"""`make gpu-test`'s own logic, on CPU: the per-check limits fit one 600-s device call (≤ 480 s in all), and
a GPU test skipped under it fails the run unless tests/gpu_skips.py expects that skip with its reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from gpu_skips import EXPECTED_GPU_SKIPS, unexpected_skips

ROOT = Path(__file__).resolve().parents[1]


def _plan(*checks: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_checks.sh", "--plan", *checks], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_default_gpu_checks_fit_one_device_call():
    p = _plan()
    assert p.returncode == 0, p.stdout + p.stderr
    total = int(re.search(r"limits total (\d+)s", p.stdout).group(1))
    limits = [int(x) for x in re.findall(r"^\S+\s+(\d+)s ", p.stdout, re.M)]
    assert len(limits) == 4 and sum(limits) == total <= 480, p.stdout


def test_gpu_checks_over_budget_refuse_to_start():
    p = _plan("pytest", "foundation", "step", "moe")
    assert p.returncode == 1 and "split them over two calls" in p.stdout, p.stdout
    assert _plan("nonsense").returncode == 1


def test_expected_skip_list_logic():
    te = "tests/test_gpu.py::test_te_layer_spec_logits_match_transformers"
    assert te in EXPECTED_GPU_SKIPS
    ok = (te, "Transformer Engine does not import here: No module named 'transformer_engine'")
    assert unexpected_skips([ok]) == []
    other_reason = (te, "needs a CUDA GPU (run `make gpu-test` on one)")  # listed test, other reason
    unlisted = ("tests/test_gpu.py::test_fused_loss_bf16_matches_float64[jsd]", "needs a CUDA GPU")
    want = [f"{n}: {r}" for n, r in (other_reason, unlisted)]
    assert unexpected_skips([ok, other_reason, unlisted]) == want


def test_strict_skips_fail_a_pytest_session_where_gpu_tests_skip():
    """pytest -m gpu on this CPU machine with OPSD_GPU_STRICT_SKIPS=1 (as gpu_checks.sh runs it): every GPU
    test skips for want of CUDA, which is not an expected skip, so the session exits 1 naming them; without
    the variable the same session passes (plain `make test` keeps skipping GPU tests)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
           "-k", "te_layer_spec or checkpoint_save_load"]  # fmt: skip
    env = dict(os.environ, OPSD_GPU_STRICT_SKIPS="1")
    strict = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert strict.returncode == 1, strict.stdout[-3000:]
    assert "not on the expected-skip list" in strict.stdout
    assert "test_checkpoint_save_load_with_distributed_optimizer: needs a CUDA GPU" in strict.stdout
    env.pop("OPSD_GPU_STRICT_SKIPS")
    plain = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stdout[-3000:]
