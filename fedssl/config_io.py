"""Typed configs in and out of TOML: presets, ``--set key=value`` overrides, dataclass building with type checks.

Generic over frozen dataclasses (``fedssl.config`` holds the run's); every value a user can get wrong
raises ``ConfigError`` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

from fedssl.errors import ConfigError


def check(ok: bool, key: str, message: str) -> None:
    """ConfigError ``config key '<key>': <message>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a TOML / --set value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        check(False, key, f"expects true or false, got {value!r}")
    if annotation is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expects an integer, got {value!r}")
        return value
    if annotation is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expects a number, got {value!r}")
        return float(value)
    if annotation is str:
        check(isinstance(value, str), key, f"expects a string, got {value!r}")
        return value
    if origin is tuple:
        check(isinstance(value, (list, tuple)), key, f"expects a list such as [2, 2, 2, 2], got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(v, item_type, key) for v in value)
    if origin is dict:
        check(isinstance(value, Mapping), key, f"expects a table such as {{ name = 0.5 }}, got {value!r}")
        item_type = typing.get_args(annotation)[1]
        if is_dataclass(item_type):
            return {str(k): build(item_type, _table(v, f"{key}.{k}"), f"{key}.{k}.") for k, v in value.items()}
        return {str(k): _coerce(v, item_type, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - no optional fields yet
        return value
    raise ConfigError(f"config key '{key}': unsupported type")  # pragma: no cover


def _table(value: Any, key: str) -> Mapping[str, Any]:
    check(isinstance(value, Mapping), key, f"is a section; set its keys as {key}.<name>=value")
    return value


def build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for name in values:
        if name not in known:
            where = f"section [{prefix.rstrip('.')}]" if prefix else "the top level"
            raise ConfigError(
                f"unknown config key '{prefix}{name}' in {where}; valid keys: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        hint = hints[f.name]
        key = prefix + f.name
        if is_dataclass(hint):
            check(isinstance(values[f.name], Mapping), key, "is a section; set its keys as "
                   f"{key}.<name>=value")
            kwargs[f.name] = build(hint, values[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(values[f.name], hint, key)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); values are TOML literals, bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value; write e.g. --set clients=100")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key; write e.g. --set clients=100")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a preset; a missing or malformed file is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing preset, e.g. configs/cifar10/fedmoco.toml")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML ({err}); fix the line it names") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dumps_toml(values: Mapping[str, Any], prefix: str = "") -> str:
    """Write a nested dict of scalars / lists / sections (any depth: ``[devices.profiles.mycam]``) as TOML (the
    subset configs use); ``prefix`` is the dotted name of the section being written."""
    def literal(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(literal(x) for x in v) + "]"
        raise ConfigError(f"cannot write {v!r} as TOML")

    def name(k: str) -> str:
        return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)

    scalars = [f"{name(k)} = {literal(v)}" for k, v in values.items() if not isinstance(v, Mapping)]
    sections = [f"\n[{prefix}{name(k)}]\n" + dumps_toml(v, f"{prefix}{name(k)}.")
                for k, v in values.items() if isinstance(v, Mapping)]
    return "\n".join(scalars) + "\n" + "".join(sections)
