"""The `no_mcore` marker: a test module that cannot depend on the megatron-core release (it never imports
megatron) runs once, in `make test`; `make test-mcore019` deselects it (`-m "not no_mcore"`). Two guards keep
the marker honest:

* static (`problems`, asserted by tests/test_no_mcore_marker.py): the marked module's import closure -- every
  `import` statement, function-local ones included, followed through this package and the tests'/benchmarks'
  helper modules, plus conftest.py -- has no `megatron` import; and its test-side files start no Python
  process (`sys.executable`, `torchrun`) and import nothing by name (`importlib`, `runpy`, `__import__`),
  which the closure could not follow;
* at run time (`blocked_megatron`, conftest.py): during a marked test's setup and call, megatron's modules are
  hidden from `sys.modules` and any import of one is recorded and fails the test, even one that the code
  under test swallows (`except ImportError`).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.abc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "no_mcore"
SPAWN_ALLOWED = {
    "stack_sources": "its only child process is `pip download` of the release wheels",
    "slurm_cluster": "conftest.py's slurm_cluster fixture; only SLURM tests (none marked) request it",
    "no_mcore": "this guard (it imports importlib.abc for its import blocker)",
    "test_no_mcore_marker": "imports megatron by name only inside the blocker, to show it biting",
}
"""Test-side helper -> why its process start or by-name import cannot reach megatron."""


def _file(name: str) -> Path | None:
    """The source of `name`: a package module, or a top-level helper in tests/ or benchmarks/."""
    parts = name.split(".")
    if parts[0] == "opsd_megatron":
        p = ROOT.joinpath(*parts)
        for f in (p / "__init__.py", p.with_suffix(".py")):
            if f.is_file():
                return f
        return None
    if len(parts) == 1:
        for d in ("tests", "benchmarks"):
            if (ROOT / d / f"{name}.py").is_file():
                return ROOT / d / f"{name}.py"
    return None


def _imports(tree: ast.AST, mod: str, is_pkg: bool):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def _dynamic(tree: ast.AST) -> list[str]:
    """Process starts and by-name imports in a test-side file (what the import closure cannot follow)."""
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "executable"
            and getattr(node.value, "id", "") == "sys"
        ):
            out.append(f"line {node.lineno}: sys.executable (a Python child process)")
        elif isinstance(node, ast.Constant) and node.value == "torchrun":
            out.append(f"line {node.lineno}: 'torchrun'")
        elif isinstance(node, ast.Name) and node.id == "__import__":
            out.append(f"line {node.lineno}: __import__")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in ("importlib", "runpy") for n in names):
                out.append(f"line {node.lineno}: imports importlib/runpy")
    return out


def problems(test_file: Path) -> list[str]:
    """Why the module `test_file` may not carry the marker ([] when it may): each megatron import in its
    closure with the module that makes it, each process start or by-name import in its test-side files."""
    out: list[str] = []
    todo = [(test_file.stem, test_file), ("conftest", ROOT / "tests" / "conftest.py")]
    seen: set[str] = set()
    while todo:
        mod, path = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        tree = ast.parse(path.read_text(), str(path))
        if not mod.startswith("opsd_megatron") and mod not in SPAWN_ALLOWED:
            out += [f"{mod}: {d}" for d in _dynamic(tree)]
        for target in _imports(tree, mod, path.name == "__init__.py"):
            parts = target.split(".")
            if parts[0] == "megatron":
                out.append(f"{mod}: imports {target}")
            for i in range(1, len(parts) + 1):  # a module's parent packages run their __init__ first
                f = _file(".".join(parts[:i]))
                if f is not None and ".".join(parts[:i]) not in seen:
                    todo.append((".".join(parts[:i]), f))
    return sorted(set(out))


def marked_modules() -> list[Path]:
    """Test modules that carry the marker (`pytestmark = pytest.mark.no_mcore`)."""
    return sorted(p for p in (ROOT / "tests").glob("test_*.py") if f"mark.{MARK}" in p.read_text())


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.hits: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "megatron":
            self.hits.append(name)
            raise ImportError(f"{name}: imported by a test marked {MARK} (tests/no_mcore.py)")
        return None


@contextlib.contextmanager
def blocked_megatron(nodeid: str):
    """Hide megatron from `sys.modules` and refuse its imports; raise if one was tried (restores both)."""
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "megatron"}
    blocker = _Blocker()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)
    if blocker.hits:
        raise AssertionError(
            f"{nodeid} is marked {MARK} (deselected by make test-mcore019) but imported "
            f"{sorted(set(blocker.hits))}: remove the marker from its module"
        )
