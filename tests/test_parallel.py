"""Unit checks of the CPU shim pieces that need no process group (the full `parallel.initialize` + shim
path runs over real gloo groups in test_conversion.py::test_parallel_initialize_and_cpu_shim)."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.mcore import cpu


def test_cpu_rng_tracker_fork_is_isolated_and_reproducible():
    tr = cpu.CpuRNGStatesTracker()
    tr.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tr.fork("model-parallel-rng"):
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tr.fork("model-parallel-rng"):
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the named stream advanced
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(4))
    states = tr.get_states()
    with tr.fork("model-parallel-rng"):
        c = torch.rand(4)
    tr.set_states(states)
    with tr.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(4), c)
    with pytest.raises(RuntimeError, match="already exists"):
        tr.add("other", 123)
    with pytest.raises(RuntimeError, match="was not added"), tr.fork("missing"):
        pass


def test_cuda_device_detection():
    assert cpu._is_cuda_device("cuda") and cpu._is_cuda_device("cuda:1") and cpu._is_cuda_device(0)
    assert cpu._is_cuda_device(torch.device("cuda", 0))
    assert not cpu._is_cuda_device("cpu") and not cpu._is_cuda_device(torch.device("cpu"))
    assert not cpu._is_cuda_device(True)


def test_clip_grad_without_cuda_assert():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 3.0)
    cpu._clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    torch.testing.assert_close(p.grad, torch.full((3,), 0.5), rtol=1e-5, atol=1e-6)
