"""YAML files and CLI overrides into validated configs, and configs back to YAML."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rayalign.config import trl
from rayalign.config.base import ConfigError, collect_errors, report


def from_dict(cls: type, data: dict[str, Any], prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types; TRL's
    names (`rayalign.config.trl`) are translated first. Every error is reported at once."""
    if prefix:
        return _build(cls, data, prefix)
    with collect_errors():
        if isinstance(data, dict):
            data, errors = trl.translate(cls, data)
            for error in errors:
                report(error)
        return _build(cls, data, prefix)


def _build(cls: type, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            close = [k for k in known if k.lower().replace("_", "") == str(key).lower().replace("_", "")]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            report(f"{name}: unknown field{hint} (known: {', '.join(sorted(known))})")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], name)
        except ConfigError as exc:  # recorded; the field keeps its default so the rest is still checked
            report(str(exc))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - missing required args
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} does not fit {tp}")
    if origin is Literal:
        if value not in args:  # raised, not recorded: the field then keeps its default
            raise ConfigError(f"{name}: got {value!r}; allowed: {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]  # TRL accepts loss_type: sigmoid as well as a list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    return value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """CLI overrides into a nested dict: `--a.b=value` / `--a.b value` (values parsed as YAML),
    and TRL's (HfArgumentParser's) syntax: `--flag` alone is true, `--no_flag` is false,
    `--loss_type sigmoid sft` (several values) is a list, `None` is null."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --key=value or --key value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            values = [_parse_value(raw)]
            i += 1
        else:
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            values = [_parse_value(raw) for raw in args[i + 1:j]]
            i = j
            if not values:  # a bare flag; TRL's --no_<flag> sets <flag> to false
                key, values = (key[3:], [False]) if key.startswith("no_") else (key, [True])
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {part} is not a section")
        node[parts[-1]] = values[0] if len(values) == 1 else values
    return out


def _parse_value(raw: str) -> Any:
    if raw == "":
        return ""
    if raw == "None":  # HfArgumentParser's spelling of null (`--max_length None`)
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """Load `cls` from an optional YAML file plus CLI-style overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {p} must hold a mapping at the top level")
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = deep_merge(data, extra)
    return from_dict(cls, data)


def to_dict(cfg) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for saving as YAML/JSON."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
