"""The package's shape, read from the source (no import): no import cycle between files, lazy imports
included; the loop and step code stay small; internal imports are module-level.

An import cycle hidden behind a function-local import still couples the two files (the 0.x layout had
`config -> config_checks -> lora -> config` that way), so every `import` statement counts, wherever it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.no_mcore  # never imports megatron: run once (tests/no_mcore.py)

PKG = Path(__file__).resolve().parents[1] / "opsd_megatron"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(mod: str, path: Path, known: dict[str, Path]):
    """(target module, function-local?) for every import of a package module in `path`."""
    tree = ast.parse(path.read_text())
    local_nodes = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in names:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != mod and not mod.startswith(t + "."):
                yield t, id(node) in local_nodes


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: {t for t, _ in _imports(m, p, known)} for m, p in known.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring edges into a package's
    own `__init__` re-exports (a package importing its children is not a cycle of logic)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if v.startswith(w + "."):  # a module reading its own package's re-exports
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    """The check can fail: a two-module cycle and a three-module one are found, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_the_package():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(" -> ".join(c) for c in cycles)


def _sizes():
    """(lines, kind, 'path:name', folder) of every class and function of the package."""
    for p in PKG.rglob("*.py"):
        folder = p.relative_to(PKG).parts[0]
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(n, ast.ClassDef) else "function"
                yield n.end_lineno - n.lineno + 1, kind, f"{p.relative_to(PKG.parent)}:{n.name}", folder


# The loop and the step are where the next engineer reads first: tighter limits there.
LIMITS = {("class", "run"): 250, ("class", "step"): 250, ("function", "run"): 80, ("function", "step"): 80}
DEFAULT_LIMITS = {"class": 250, "function": 100}


def test_classes_and_functions_stay_small():
    over = [
        f"{where}: {kind} of {n} lines (limit {LIMITS.get((kind, folder), DEFAULT_LIMITS[kind])})"
        for n, kind, where, folder in _sizes()
        if n > LIMITS.get((kind, folder), DEFAULT_LIMITS[kind])
    ]
    assert not over, "\n".join(over)


# What each folder may import (docs/architecture.md, "Folders"): lower layers never reach up. A module of a
# folder may import its own folder and the folders listed; a (folder, module) pair narrows an allowance to
# named modules where only those make sense.
MAY_IMPORT: dict[str, set[str]] = {
    "config": {"opsd_megatron.mcore.layout", "opsd_megatron.data.prompts"},  # torch-free leaves only
    "losses": set(),
    "mcore": {"config"},
    "data": {"config"},
    "rollout": {"config", "data", "losses", "mcore", "opsd_megatron.evaluation.grader"},
    "evaluation": {
        "config",
        "data",
        "mcore",
        "rollout",
        "opsd_megatron.run.lifeline",
        "opsd_megatron.run.preflight",
        "opsd_megatron.run.training_checkpoint",
    },  # fmt: skip
    "observe": {"opsd_megatron.evaluation.paired", "opsd_megatron.mcore.layout"},
    "step": {"config", "losses", "mcore", "rollout", "observe", "opsd_megatron.run.setup"},
    "run": {"config", "data", "evaluation", "losses", "mcore", "observe", "rollout", "step"},
    "demo": {"config", "data", "observe"},
    "cli": {"config", "data", "evaluation", "mcore", "observe", "rollout", "run", "step", "demo"},
}


def _folder(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (PKG / parts[1]).is_dir() else "(top)"


def _allowed(src: str, dst: str) -> bool:
    f, g = _folder(src), _folder(dst)
    if f == g or f == "(top)":
        return True
    allow = MAY_IMPORT[f]
    return g in allow or any(dst == a or dst.startswith(a + ".") for a in allow if "." in a)


def test_folders_import_only_what_the_architecture_allows():
    known = _modules()
    bad = sorted(
        f"{m} -> {t}" for m, p in known.items() for t, _ in _imports(m, p, known) if not _allowed(m, t)
    )
    assert not bad, "imports that reach up a layer (docs/architecture.md, 'Folders'):\n" + "\n".join(bad)
    assert not _allowed("opsd_megatron.mcore.models.forward", "opsd_megatron.step.batch")  # the check bites


# Function-local imports of the package's own modules hide dependencies (and once hid cycles). Allowed only
# where the target needs an optional dependency, and in the command lines (a user's mistake is reported
# before torch and Megatron load).
LAZY_OK = {
    ("opsd_megatron.losses._phases", "opsd_megatron.losses.triton_phases"),  # triton
    ("opsd_megatron.rollout", "opsd_megatron.rollout.vllm_engine"),  # vLLM
    ("opsd_megatron.rollout", "opsd_megatron.rollout.hf_engine"),  # transformers' generate path
}


def test_internal_imports_are_module_level():
    known = _modules()
    lazy = sorted(
        {
            f"{m} -> {t}"
            for m, p in known.items()
            for t, is_local in _imports(m, p, known)
            if is_local and _folder(m) != "cli" and (m, t) not in LAZY_OK
        }
    )
    assert not lazy, "function-local imports of package modules:\n" + "\n".join(lazy)
