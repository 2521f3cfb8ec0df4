"""Settings objects read from environment variables: one frozen dataclass per process kind (the worker's
`worker.settings.Settings`, the HTTP API's `api.settings.ApiSettings`).

A field is declared with `setting(variable, default, meaning, low=, high=, choices=)`; `from_env(cls, environ)`
reads the variables that are set (blank counts as unset), `check_fields(instance, normalize)` checks bounds and
choices (a bad value raises ValueError naming the variable), `describe_rows(cls)` gives the README's table rows.
`FleetSettings` is the mixin of the properties both kinds derive from the shared Redis, S3 and limit variables.
"""
import math
import os
from dataclasses import asdict, field, fields
from typing import Callable

from api_client import schema
from api_client.schema import redact_url

__all__ = ["setting", "from_env", "check_fields", "describe_rows", "parse_value", "FleetSettings"]


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


def check_fields(instance, normalize: Callable[[object, str], str] = lambda item, value: value) -> None:
    """Check every field's bounds and choices; raises ValueError naming the variable. A field with choices is
    compared, and stored, as normalize(item, value) returns it (the consumers compare with the exact spelling)."""
    for item in fields(instance):
        value, meta = getattr(instance, item.name), item.metadata
        variable = meta["variable"]
        if meta["choices"] is not None:
            if normalize(item, value) not in meta["choices"]:
                raise ValueError(f"{variable}={value!r}: expected one of "
                                 f"{', '.join(c for c in meta['choices'] if c)}")
            object.__setattr__(instance, item.name, normalize(item, value))
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{variable}={value!r}: expected a finite number")
        low, high = meta["low"], meta["high"]
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{variable}={value}: outside [{low}, {'inf' if high is None else high}]")


class FleetSettings:
    """Properties of a settings dataclass with the fleet's shared fields: broker_url, state_url, s3_endpoint_url,
    bucket, allowed_buckets and the job limits (max_pixels, max_steps, max_images, max_prompt_chars)."""

    def redacted(self) -> dict:
        values = asdict(self)
        for name in ("broker_url", "state_url", "s3_endpoint_url"):
            values[name] = redact_url(values[name])
        return values

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.redacted()})"

    @property
    def state_redis_url(self) -> str:
        return self.state_url or self.broker_url

    @property
    def bucket_allowlist(self) -> frozenset:
        listed = {name.strip() for name in self.allowed_buckets.split(",") if name.strip()}
        return frozenset(listed or ({self.bucket} if self.bucket else set()))

    @property
    def limits(self) -> schema.Limits:
        return schema.Limits(max_pixels=self.max_pixels, max_steps=self.max_steps, max_images=self.max_images,
                             max_prompt_chars=self.max_prompt_chars)
