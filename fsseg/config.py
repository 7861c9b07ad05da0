"""YAML configuration validated into dataclasses, with ``--set key=value`` overrides.

Unknown keys and values of the wrong type are errors naming the dotted key, raised at start-up rather than
hours into a run. Values of ``--set`` are parsed as YAML
(``--set optim.lr=3e-4 --set model.kwargs={feature_size: 24}``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fsseg.errors import ConfigError
from fsseg.resources import find_config

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a syntax error is a ConfigError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(error, 'problem', error)}") from None
    if data is None:
        raise ConfigError(
            f"{path}: the config file is empty; give at least one setting, or leave --config out for the defaults"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set dotted keys from ``key=value`` strings (values parsed as YAML) in a copy of ``data``."""
    result = _deep_copy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set '{override}': expected key=value, e.g. optim.lr=1e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set '{override}': value is not valid YAML") from None
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set '{override}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def ranged(default: Any = dataclasses.MISSING, interval: str = "[0, inf)", *, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose number (or each number of a list) must lie in ``interval``, e.g. ``"(0, inf)"``
    or ``"[0, 1)"``; :func:`from_dict` checks it and names the key. ``help`` says what it does."""
    return dataclasses.field(default=default, metadata={"interval": interval, "help": help}, **kwargs)


def setting(default: Any = dataclasses.MISSING, *, help: str, **kwargs: Any) -> Any:
    """A dataclass field of a config with its ``help`` text, which ``--help-config`` lists."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every key of config dataclass ``cls`` (nested ones dotted) with its default and help text."""
    keys = []
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        key, hint = prefix + spec.name, hints[spec.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            keys += config_keys(hint, key + ".")
            continue
        default = spec.default if spec.default_factory is dataclasses.MISSING else spec.default_factory()
        shown = "required" if default is dataclasses.MISSING else as_yaml(default)
        keys.append((key, shown, spec.metadata.get("help", "")))
    return keys


def as_yaml(value: Any) -> str:
    """``value`` as one line of YAML (lists in brackets, strings quoted where YAML needs it)."""
    return yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def described_keys(cls: type, prefix: str = "") -> dict[str, str]:
    """:func:`config_keys` as ``{"key (default: value)": help}``, what ``--help-config`` prints."""
    return {f"{key} (default: {default})": text for key, default, text in config_keys(cls, prefix)}


def check_interval(value: Any, interval: str, where: str) -> None:
    """Raise ConfigError when ``value`` (a number, or each number of a list) lies outside ``interval``."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            check_interval(item, interval, where)
        return
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    if not (above and below):
        raise ConfigError(f"{where} must lie in {interval}, got {value!r}")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        values[name] = _convert(hints[name], value, key)
        if "interval" in fields[name].metadata:
            check_interval(values[name], fields[name].metadata["interval"], key)
    missing = [n for n, f in fields.items() if n not in values and _required(f)]
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join((where + '.' if where else '') + m for m in missing)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or 'config'}: {error}") from None


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def to_dict(instance: Any) -> Any:
    """A dataclass as plain YAML-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(instance):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, (list, tuple)):
        return [to_dict(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    return instance


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (YAML; optional; ``configs/...`` falls back to the shipped copy), apply ``overrides`` and
    validate into ``cls``."""
    data = load_yaml(find_config(path)) if path else {}
    return from_dict(cls, apply_overrides(data, overrides))
