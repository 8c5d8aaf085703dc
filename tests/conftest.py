"""Shared, session-scoped tiny fixtures: one locally trained tokenizer and one tiny HF model per
architecture, built once per test session (keeps `make test` fast on 2 cores)."""

from __future__ import annotations

import os

import pytest
from no_mcore import MARK, blocked_megatron

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config):
    """The library versions this run tests (CI runs the suite on two megatron-core releases)."""
    from opsd_megatron.mcore.versions import installed

    return "stack: " + ", ".join(
        f"{d} {installed(d)}" for d in ("torch", "megatron-core", "vllm", "transformers")
    )


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from opsd_megatron.demo.tiny import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir):
    """`tiny_models(arch)` -> directory of a tiny random HF model (fp32) of that arch, built once."""
    from opsd_megatron.demo.tiny import make_tiny_hf_model

    cache: dict[str, object] = {}

    def get(arch: str = "qwen3"):
        if arch not in cache:
            d = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[arch] = make_tiny_hf_model(d, arch, tokenizer_dir=tiny_tokenizer_dir)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_models):
    return tiny_models("qwen3")


@pytest.fixture(scope="module")
def slurm_cluster():
    """A private two-node SLURM cluster for one test module (tests/slurm_cluster.py); skips with the reason
    when SLURM cannot be installed here."""
    from slurm_cluster import running_cluster

    yield from running_cluster()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """A test marked no_mcore (tests/no_mcore.py) must not import megatron, fixtures included."""
    if item.get_closest_marker(MARK) is None:
        return (yield)
    with blocked_megatron(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if item.get_closest_marker(MARK) is None:
        return (yield)
    with blocked_megatron(item.nodeid):
        return (yield)


# `make gpu-test` (OPSD_GPU_STRICT_SKIPS=1): a skip not in tests/gpu_skips.EXPECTED_GPU_SKIPS fails the run.
_SKIPS: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("OPSD_GPU_STRICT_SKIPS") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("OPSD_GPU_STRICT_SKIPS") != "1":
        return
    from gpu_skips import unexpected_skips

    bad = unexpected_skips(_SKIPS)
    if bad:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            "\nFAILED: skipped under make gpu-test, not on the expected-skip list (tests/gpu_skips.py):\n  "
            + "\n  ".join(bad)
        )
        session.exitstatus = 1
