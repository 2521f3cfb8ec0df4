"""Settings objects read from environment variables: one frozen dataclass per process kind.

A field is declared with `setting(variable, default, meaning, low=, high=, choices=)`; `from_env(cls, environ)`
reads the variables that are set (blank counts as unset), `check_fields(instance)` checks bounds and choices (a bad
value raises ValueError naming the variable), `describe(cls)` gives the README's table rows. Stdlib only.
"""
import math
import os
from dataclasses import field, fields

__all__ = ["setting", "from_env", "check_fields", "describe_rows"]


def setting(variable: str, default, meaning: str, low=None, high=None, choices=None):
    return field(default=default, metadata={"variable": variable, "meaning": meaning, "low": low, "high": high,
                                            "choices": choices})


def from_env(cls, environ=None):
    """An instance of the settings dataclass `cls` from `environ` (default os.environ)."""
    env = os.environ if environ is None else environ
    values = {}
    for item in fields(cls):
        raw = env.get(item.metadata["variable"])
        if raw is not None and raw.strip() != "":
            values[item.name] = parse_value(item, raw.strip())
    return cls(**values)


def describe_rows(cls) -> list[str]:
    """One Markdown table row per variable: name, default, meaning."""
    rows = []
    for item in fields(cls):
        default = item.default if item.default != "" else "(empty)"
        rows.append(f"| `{item.metadata['variable']}` | `{default}` | {item.metadata['meaning']} |")
    return rows


def parse_value(item, raw: str):
    variable, kind = item.metadata["variable"], type(item.default)
    if kind is bool:
        lowered = raw.lower()
        if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(f"{variable}={raw!r}: expected true/false (1/0, yes/no, on/off)")
        return lowered in ("1", "true", "yes", "on")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{variable}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
    return raw


def check_fields(instance) -> None:
    """Bounds and choices of every field; raises ValueError naming the variable."""
    for item in fields(instance):
        value, meta = getattr(instance, item.name), item.metadata
        variable = meta["variable"]
        if meta["choices"] is not None and value not in meta["choices"]:
            raise ValueError(f"{variable}={value!r}: expected one of {', '.join(c for c in meta['choices'] if c)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{variable}={value!r}: expected a finite number")
        low, high = meta["low"], meta["high"]
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{variable}={value}: outside [{low}, {'inf' if high is None else high}]")
