"""Value checks shared by the config dataclasses, and the dict -> dataclass builder.

Every failure is a ConfigError naming the dotted key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from klein_sweep.errors import ConfigError


def build_dataclass(cls, values: dict[str, Any], prefix: str):
    """Build `cls` from a dict, rejecting unknown keys and values of the wrong type by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}", values[key], f"unknown key; valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(f"{prefix}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint) -> Any:
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, value, "a value is required")
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(key, value, "an integer")
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        if not math.isfinite(value):
            raise ConfigError(key, value, "a finite number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    if base is list or typing.get_origin(base) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list")
        return list(value)
    return value


def check_choice(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(key, value, f"one of {', '.join(valid)}")


def check_int(key: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(key, value, f"an integer in [{low}, {high}]")


def check_float(key: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(key, value, f"a number in {bracket}{low:g}, {high:g}]")

