"""Pass/fail thresholds shared by the benchmark scripts and the GPU tests (docs/performance.md gives the
anchors behind each number).

`OPSD_THRESHOLD_SCALE` (default 1) multiplies every threshold: `OPSD_THRESHOLD_SCALE=0.01 make gpu-test`
must fail, which shows that the checks have teeth (they compare, they do not only print).
"""

from __future__ import annotations

import os

LIMITS = {
    # fused divergence vs the 4 plain GEMMs of the same shapes (time) and vs naive autograd (memory)
    "cpu_loss_time_x_floor": 1.5,  # T 1024 x H 256 x V 32768 fp32, 2 threads
    "cpu_loss_mem_x_naive": 0.05,  # T 4096 x H 256 x V 32768 fp32, forward + backward
    "gpu_loss_time_x_floor": 1.15,  # 8192 x 4096 x 151936 bf16, forward KL, clip 0.05
    "gpu_loss_mem_gib": 2.5,
    "gpu_step_x_plain": 1.10,  # OPSD train step vs plain teacher fwd + student fwd/bwd
    "eval_engines_x_one": 0.6,  # evaluation wall time on two engines vs one (bench_eval.py, issue 22)
}


def limit(name: str) -> float:
    """The threshold `name` of `LIMITS`, times OPSD_THRESHOLD_SCALE."""
    return LIMITS[name] * float(os.environ.get("OPSD_THRESHOLD_SCALE", "1"))


def check(name: str, value: float, failures: list[str]) -> str:
    """'ok' or 'MISS' for `value <= limit(name)`; a miss is appended to `failures`."""
    lim = limit(name)
    if value <= lim:
        return f"ok ({value:.3f} <= {lim:.3f})"
    failures.append(f"{name}: {value:.3f} > {lim:.3f}")
    return f"MISS ({value:.3f} > {lim:.3f})"
