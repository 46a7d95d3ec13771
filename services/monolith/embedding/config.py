"""Typed, validated per-slot configuration of the embedding tables.

A slot is one feature's table (user id, movie id, ...). Each slot has its own dimension,
initializer, optimizer, admission filter and expiry, as in the paper's per-slot configs.
Every check raises `ConfigError` naming the field path and the problem.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


INITIALIZERS = ("zeros", "uniform", "normal")
OPTIMIZERS = ("sgd", "adagrad", "ftrl", "adam")
FILTERS = ("none", "counting", "probabilistic")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


@dataclasses.dataclass(frozen=True)
class InitializerConfig:
    """How a new row's embedding starts; deterministic per (slot, id, seed).

    Attributes:
        kind: "zeros", "uniform" (in [-scale, scale]) or "normal" (mean 0, stddev scale).
        scale: half-width of the uniform range, or the normal's standard deviation.
    """

    kind: str = "uniform"
    scale: float = 0.05


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """A sparse optimizer, applied per row with its own state.

    Attributes:
        kind: "sgd", "adagrad", "ftrl" or "adam".
        learning_rate: step size (> 0).
        initial_accumulator: starting accumulator of adagrad and ftrl (>= 0).
        epsilon: added to denominators of adagrad and adam (>= 0).
        beta1: adam's first-moment decay, in [0, 1).
        beta2: adam's second-moment decay, in [0, 1).
        l1: ftrl's L1 strength (>= 0).
        l2: ftrl's L2 strength (>= 0).
        beta: ftrl's beta (>= 0), added to sqrt(n) in the denominator.
    """

    kind: str = "adagrad"
    learning_rate: float = 0.05
    initial_accumulator: float = 0.1
    epsilon: float = 1e-7
    beta1: float = 0.9
    beta2: float = 0.999
    l1: float = 0.0
    l2: float = 0.0
    beta: float = 1.0

    @property
    def state_width_per_dim(self) -> int:
        """Floats of optimizer state per embedding element."""
        return {"sgd": 0, "adagrad": 1, "ftrl": 2, "adam": 2}[self.kind]

    def state_width(self, dim: int) -> int:
        """Floats of optimizer state per row (adam also keeps the row's step count)."""
        return self.state_width_per_dim * dim + (1 if self.kind == "adam" else 0)


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
    """Which new ids get a row.

    Attributes:
        filter: "none" (admit at first sight), "counting" (exact occurrence counts: admit at
            the `threshold`-th occurrence) or "probabilistic" (the paper's stateless filter:
            each occurrence admits with probability p = 1 - 0.05 ** (1 / threshold), so an id
            is admitted by its threshold-th occurrence with probability 0.95).
        threshold: occurrences needed (>= 1); 1 admits at first sight.
    """

    filter: str = "none"
    threshold: int = 1


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """One feature slot's table.

    Attributes:
        name: unique slot name.
        dim: embedding dimension (1..4096).
        initializer: how new rows start.
        optimizer: the sparse optimizer.
        admission: the admission filter.
        expire_after: seconds without an update after which a row is evicted; None keeps
            rows forever.
        seed: initializer seed (rows re-created with the same seed start identical).
    """

    name: str
    dim: int = 16
    initializer: InitializerConfig = InitializerConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    admission: AdmissionConfig = AdmissionConfig()
    expire_after: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _validate_slot(self)


def _fail(path: str, problem: str) -> None:
    raise ConfigError(f"{path}: {problem}")


def _validate_slot(slot: SlotConfig, path: str = "") -> None:
    p = f"{path}." if path else ""
    if not isinstance(slot.name, str) or not slot.name:
        _fail(f"{p}name", "must be a non-empty string")
    if not isinstance(slot.dim, int) or isinstance(slot.dim, bool) or not 1 <= slot.dim <= 4096:
        _fail(f"{p}dim", f"must be an integer in 1..4096, got {slot.dim!r}")
    init = slot.initializer
    if init.kind not in INITIALIZERS:
        _fail(f"{p}initializer.kind", f"must be one of {', '.join(INITIALIZERS)}, got {init.kind!r}")
    if not _finite(init.scale) or init.scale < 0:
        _fail(f"{p}initializer.scale", f"must be a finite number >= 0, got {init.scale!r}")
    opt = slot.optimizer
    if opt.kind not in OPTIMIZERS:
        _fail(f"{p}optimizer.kind", f"must be one of {', '.join(OPTIMIZERS)}, got {opt.kind!r}")
    if not _finite(opt.learning_rate) or opt.learning_rate <= 0:
        _fail(f"{p}optimizer.learning_rate", f"must be a finite number > 0, got {opt.learning_rate!r}")
    for name in ("initial_accumulator", "epsilon", "l1", "l2", "beta"):
        value = getattr(opt, name)
        if not _finite(value) or value < 0:
            _fail(f"{p}optimizer.{name}", f"must be a finite number >= 0, got {value!r}")
    for name in ("beta1", "beta2"):
        value = getattr(opt, name)
        if not _finite(value) or not 0 <= value < 1:
            _fail(f"{p}optimizer.{name}", f"must be in [0, 1), got {value!r}")
    adm = slot.admission
    if adm.filter not in FILTERS:
        _fail(f"{p}admission.filter", f"must be one of {', '.join(FILTERS)}, got {adm.filter!r}")
    if not isinstance(adm.threshold, int) or isinstance(adm.threshold, bool) or not 1 <= adm.threshold <= 2**30:
        _fail(f"{p}admission.threshold", f"must be an integer in 1..2**30, got {adm.threshold!r}")
    if slot.expire_after is not None and (not _finite(slot.expire_after) or slot.expire_after <= 0):
        _fail(f"{p}expire_after", f"must be a number of seconds > 0 (or null), got {slot.expire_after!r}")
    if not isinstance(slot.seed, int) or isinstance(slot.seed, bool):
        _fail(f"{p}seed", f"must be an integer, got {slot.seed!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_keys(raw: Any, cls: type, path: str, ignore: frozenset[str] = frozenset()) -> None:
    if not isinstance(raw, Mapping):
        _fail(path, f"must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - known - ignore)
    if unknown:
        _fail(path, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known | ignore))}")


def slot_from_dict(raw: Any, path: str, ignore: frozenset[str] = frozenset()) -> SlotConfig:
    """Builds one SlotConfig from parsed YAML, with errors naming the field under `path`.

    Args:
        raw: the slot's mapping.
        path: where it sits in the file, e.g. "slots[2]".
        ignore: keys that belong to another layer of the config (e.g. the data source) and
            are neither used nor rejected here.
    """
    _check_keys(raw, SlotConfig, path, ignore)
    if "name" not in raw:
        _fail(f"{path}.name", "is required")
    fields: dict[str, Any] = {k: v for k, v in raw.items() if k not in ignore}
    nested = {"initializer": InitializerConfig, "optimizer": OptimizerConfig, "admission": AdmissionConfig}
    for key, cls in nested.items():
        if fields.get(key) is not None:
            _check_keys(fields[key], cls, f"{path}.{key}")
            fields[key] = cls(**fields[key])
        else:
            fields.pop(key, None)
    try:
        return SlotConfig(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc}") from None


def slots_from_list(raw: Any, path: str = "slots", ignore: frozenset[str] = frozenset()) -> tuple[SlotConfig, ...]:
    """Builds the slot list from parsed YAML; slot names must be unique."""
    if not isinstance(raw, list) or not raw:
        _fail(path, "must be a non-empty list of slots")
    slots = tuple(slot_from_dict(item, f"{path}[{i}]", ignore) for i, item in enumerate(raw))
    seen: set[str] = set()
    for i, slot in enumerate(slots):
        if slot.name in seen:
            _fail(f"{path}[{i}].name", f"duplicate slot name {slot.name!r}")
        seen.add(slot.name)
    return slots

