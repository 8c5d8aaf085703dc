"""The strict YAML loader of an OPSD run configuration, with `key.sub=value` overrides.

    cfg = load_config("examples/tiny_cpu_demo.yaml", ["train.steps=5", "parallel.tp=2"])
    cfg = config_from_dict({"model": {"path": "m"}, "data": {"path": "builtin:tiny_math"}})

Strict: an unknown key or a value of the wrong type raises `ConfigError`, one sentence naming the key. Values
are checked against the dataclass annotations of `config.schema` (int accepted for float, YAML 1.1's "5e-6"
string read as a float, a quoted "true"/"false" for a boolean choice); `config_from_dict` then runs
`checks.validate`, `load_config` also `checks.validate_model` (the model's local config.json, if any).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from opsd_megatron.config.checks import validate, validate_model
from opsd_megatron.config.schema import ConfigError, OPSDConfig, choice_text, is_choice

__all__ = ["apply_overrides", "config_from_dict", "load_config"]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce_literal(key: str, value: Any, allowed: tuple) -> Any:
    if isinstance(value, str) and True in allowed and value.lower() in ("true", "false"):
        value = value.lower() == "true"  # a quoted "true" for a choice that includes the booleans
    if not is_choice(value, allowed):
        raise ConfigError(f"config key '{key}': must be one of {choice_text(allowed)}, got {value!r}.")
    return value


def _coerce_union(key: str, value: Any, tp: Any) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(key, value, a)
        except ConfigError:
            pass
    names = " or ".join(_type_name(a) for a in args)
    raise ConfigError(f"config key '{key}': expected {names}, got {type(value).__name__} {value!r}.")


def _coerce_list(key: str, value: Any, tp: Any) -> list:
    (item_tp,) = typing.get_args(tp)
    if not isinstance(value, list):
        raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}.")
    if typing.get_origin(item_tp) is Literal:  # e.g. sft.formats: the error names the list's key
        allowed = typing.get_args(item_tp)
        for v in value:
            if v not in allowed:
                raise ConfigError(f"config key '{key}': lists {'/'.join(allowed)}, got {v!r}.")
        return list(value)
    return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (int accepted for float); raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _coerce_literal(key, value, typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(key, value, tp)
    if origin is list:
        return _coerce_list(key, value, tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(
            f"config key '{key}': expected {tp.__name__}, got {type(value).__name__} {value!r}."
        )
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, recursing into dataclass-typed fields."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"config key '{prefix or '<root>'}': expected a mapping, got {type(data).__name__}."
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"config key '{key}' is unknown; valid keys here: {', '.join(sorted(names))}.")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, key)
        else:
            kwargs[k] = _coerce(key, v, tp)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings (value parsed as YAML) to a nested dict, in order."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value.")
        key, _, raw = ov.partition("=")
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: config key '{p}' is not a section.")
            node = nxt
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def config_from_dict(data: dict) -> OPSDConfig:
    """Build and validate an `OPSDConfig` from a nested dict (strict)."""
    return validate(_build(OPSDConfig, data, ""))


def _yaml_where(e: yaml.YAMLError) -> str:
    """` line L, column C` (1-based) of a YAML syntax error, when the parser knows it."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return "" if mark is None else f" line {mark.line + 1}, column {mark.column + 1}"


def _yaml_why(e: yaml.YAMLError) -> str:
    problem, context = getattr(e, "problem", None), getattr(e, "context", None)
    if problem:
        return f"{problem} ({context})" if context else str(problem)
    return str(e).splitlines()[0]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> OPSDConfig:
    """Read YAML `path` (None: defaults only), apply `key.sub=value` overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist.")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config file {str(p)!r}{_yaml_where(e)} is not valid YAML: {_yaml_why(e)}."
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level.")
    apply_overrides(data, list(overrides or []))
    cfg = config_from_dict(data)
    validate_model(cfg)
    return cfg
