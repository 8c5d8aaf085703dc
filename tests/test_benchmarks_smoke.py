"""Every benchmark script in its smoke mode (tiny shapes, CPU), so that none can rot: ONE spawned process
(`benchmarks/smoke_all.py`: the heavy imports once, then each script in a fork of it) whose per-script
results the tests below read. Each script must exit 0 and print its table (the marker line of
`smoke_all.SMOKES`). Timings are printed by the runner, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from smoke_all import SMOKES  # noqa: E402

NOT_SCRIPTS = {"thresholds.py", "smoke_all.py"}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_smoke") / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "smoke_all.py"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)  # fmt: skip
    print(proc.stdout[-4000:])
    assert out.is_file(), f"the smoke runner wrote no results (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    return rows, proc.returncode


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")} - NOT_SCRIPTS
    assert scripts == set(SMOKES), f"no smoke entry in smoke_all.SMOKES: {scripts - set(SMOKES)}"


@pytest.mark.parametrize("name", sorted(SMOKES))
def test_benchmark_smoke_exits_0_and_prints_its_table(smoke_results, name):
    rows, _ = smoke_results
    r = rows[name]
    assert r["rc"] == 0, f"{name} exited {r['rc']}:\n{r['tail']}"
    assert r["table"], f"{name} did not print its table ({SMOKES[name][1]!r}):\n{r['tail']}"


def test_smoke_runner_exit_status_agrees(smoke_results):
    rows, rc = smoke_results
    assert rc == (0 if all(r["ok"] for r in rows.values()) else 1)


def test_an_errored_baseline_row_is_a_failure_not_a_skip():
    from bench_loss import row_errors

    absent = "ModuleNotFoundError: No module named 'liger_kernel'"
    rows = {"floor (4 GEMMs)": {"error": "RuntimeError: boom"}, "ours fused, clip": {"ms": 1.0},
            "liger jsd_beta=0 (no clip)": {"error": absent}}  # fmt: skip
    assert row_errors(rows, list(rows)) == ["floor (4 GEMMs) raised: RuntimeError: boom"]
    assert row_errors({}, ["naive, clip"]) == ["naive, clip raised: no result"]  # a missing row too
    broken_liger = {"liger jsd_beta=0 (no clip)": {"error": "RuntimeError: CUDA error"}}
    assert row_errors(broken_liger, list(broken_liger)), "only Liger's absence may be skipped"
