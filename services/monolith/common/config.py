"""The typed-config base: frozen pydantic models whose errors name the field path.

Every config of the project (tables, the model, server flags) is a `ConfigModel`: frozen,
unknown keys rejected, strict types (no "3" for 3, no true for 1). `parse_config` turns
parsed YAML or flags into one, and turns pydantic's errors into one `ConfigError` whose
message names each bad field by its path in the file, e.g.
`features[2].optimizer.learning_rate: must be greater than 0, got -1`.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Annotated, TypeVar

import pydantic
from pydantic import BeforeValidator, ConfigDict

from monolith.common.errors import ConfigError, shorten

M = TypeVar("M", bound="ConfigModel")


class ConfigModel(pydantic.BaseModel):
    """Base of every config: frozen, no unknown fields, strict types.

    Built in code (`TableConfig(name=..., dim=0)`), a bad value raises pydantic's
    ValidationError; read from a file or flags, use `parse_config`, which raises ConfigError.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


LIST_AS_TUPLE = BeforeValidator(_as_tuple)
"""Annotation for tuple fields: YAML gives lists, frozen (hashable) configs hold tuples."""

IntTuple = Annotated[tuple[Annotated[int, pydantic.Field(ge=1)], ...], LIST_AS_TUPLE]
"""A tuple of positive integers that YAML may write as a list."""


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0 (0 may mean "off" where a flag says so).

    argparse's float accepts "nan" and "inf", which then pass every `<= 0` check and turn
    a periodic task into a busy loop or kill its thread.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def parse_config(cls: type[M], raw: Any, path: str = "") -> M:
    """Validates parsed YAML (or flags) into `cls`.

    Args:
        cls: the config model.
        raw: a mapping (None means every default).
        path: where `raw` sits in its file, prefixed to every field path.

    Raises:
        ConfigError: naming each bad field by its path, what is wrong, and the value given.
    """
    try:
        return cls.model_validate({} if raw is None else raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(describe_errors(exc, path)) from None


def describe_errors(exc: pydantic.ValidationError, path: str = "") -> str:
    """One line per error: `field.path: problem, got value`."""
    return "; ".join(_describe(error, path) for error in exc.errors(include_url=False))


def field_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    """("features", 2, "optimizer", "learning_rate") -> "features[2].optimizer.learning_rate"."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "config"


def _describe(error: Any, prefix: str) -> str:
    # Pydantic tags function and union validators onto the location; they name no field.
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    where = field_path(loc, prefix)
    kind = error["type"]
    message = error["msg"]
    if kind == "extra_forbidden":
        return f"{where}: unknown field"
    if kind == "missing":
        return f"{where}: is required"
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
        if not loc:  # a check across fields: its message names the fields itself
            return f"{prefix}.{message}" if prefix else message
    message = message[:1].lower() + message[1:]
    if "input" not in error:
        return f"{where}: {message}"
    return f"{where}: {message}, got {shorten(repr(error['input']))}"
