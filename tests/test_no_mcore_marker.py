"""The `no_mcore` marker (tests/no_mcore.py) is honest: every marked module's import closure is free of
megatron and starts no process; the static check and the run-time blocker both bite."""

from __future__ import annotations

import contextlib

import pytest
from no_mcore import ROOT, blocked_megatron, marked_modules, problems

pytestmark = pytest.mark.no_mcore


@pytest.mark.parametrize("path", marked_modules(), ids=lambda p: p.stem)
def test_marked_module_never_reaches_megatron(path):
    assert problems(path) == [], f"{path.name} carries the no_mcore marker but:\n" + "\n".join(problems(path))


def test_the_marked_set_includes_the_pure_modules():
    assert {"test_layout", "test_losses", "test_stack", "test_no_mcore_marker"} <= {
        p.stem for p in marked_modules()
    }


def test_static_check_bites(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text(
        "import subprocess, sys\n"
        "from opsd_megatron.config import schema\n"
        "def test_x():\n"
        "    from opsd_megatron.mcore import cpu\n"  # a function-local import reaching megatron
        "    subprocess.run([sys.executable, '-c', 'pass'])\n"
    )
    found = "\n".join(problems(bad))
    assert "opsd_megatron.mcore.cpu: imports megatron" in found, found
    assert "test_bad: line 5: sys.executable" in found, found
    assert problems(ROOT / "tests" / "test_layout.py") == []


def test_runtime_blocker_bites():
    import importlib

    msg = "marked no_mcore .* imported \\['megatron"
    # an import the code under test swallows is still a failure
    with pytest.raises(AssertionError, match=msg), blocked_megatron("t"), contextlib.suppress(ImportError):
        importlib.import_module("megatron.core")
    with blocked_megatron("t"):
        importlib.import_module("json")
