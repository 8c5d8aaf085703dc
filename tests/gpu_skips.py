"""Under `make gpu-test` a skipped GPU test is a failure unless it is listed here with its reason: on the lent
GPU image a skip means a check that did not run, and a run that passes by skipping proves nothing.

`tests/conftest.py` applies it when OPSD_GPU_STRICT_SKIPS=1 (set by benchmarks/gpu_checks.sh): every skip is
checked with `unexpected_skips` at the end of the session, and the session fails (exit 1) naming the
unexpected ones.
"""

from __future__ import annotations

EXPECTED_GPU_SKIPS: dict[str, tuple[str, str]] = {
    # test node id: (text the skip reason must contain, why that skip is expected on the lent image)
    "tests/test_gpu.py::test_te_layer_spec_logits_match_transformers": (
        "Transformer Engine does not import",
        "the lent GPU image has no Transformer Engine (and no network to install it)",
    ),
    "tests/test_gpu.py::test_weight_link_streams_refresh_over_nccl": (
        "needs 2 GPUs",
        "the lent GPU machines have one GPU; NCCL refuses two ranks on one device",
    ),
    "tests/test_gpu.py::test_context_parallel_response_gathers_match_transformers": (
        "context parallelism",  # "needs 2 GPUs" (one-GPU lent machines) or "... Transformer Engine ..."
        "CP2 needs two GPUs (lent machines have one); its te case Transformer Engine (not on the image)",
    ),
}
"""The short list of skips that do not fail `make gpu-test` (no TE / no vLLM on the lent image)."""


def unexpected_skips(skips: list[tuple[str, str]], expected: dict | None = None) -> list[str]:
    """`skips`: (node id, skip reason) of each skipped test. Returns "node id: reason" for each skip that is
    not listed in `expected` (default EXPECTED_GPU_SKIPS) with a reason containing the listed text."""
    expected = EXPECTED_GPU_SKIPS if expected is None else expected
    out = []
    for nodeid, reason in skips:
        want = expected.get(nodeid.split("[")[0])
        if want is None or want[0] not in reason:
            out.append(f"{nodeid}: {reason}")
    return out
