"""Typed, validated configuration of one embedding table (what an embedding-PS shard holds).

Each table has its own dimension, initializer, optimizer, admission filter and expiry, as
in the paper's per-table configs. The model config (`monolith.model.config`) declares
*features*; each feature owns a table (and optionally a dim-1 bias table) built from these.
Bad values raise `ConfigError` naming the field path (see `monolith.common.config`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from monolith.common.config import ConfigModel

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Decay = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class InitializerConfig(ConfigModel):
    """How a new row's embedding starts; deterministic per (table, id, seed).

    Attributes:
        kind: "zeros", "uniform" (in [-scale, scale]) or "normal" (mean 0, stddev scale).
        scale: half-width of the uniform range, or the normal's standard deviation.
    """

    kind: Literal["zeros", "uniform", "normal"] = "uniform"
    scale: NonNegative = 0.05


class OptimizerConfig(ConfigModel):
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
        accumulate: what adagrad's and ftrl's squared-gradient accumulators add when one
            step applies an id's gradients summed over its occurrences in a batch:
            "occurrences", the sum of their squares (as a step per occurrence would add);
            "sums", the square of their sum (the summed gradient taken as one).
    """

    kind: Literal["sgd", "adagrad", "ftrl", "adam"] = "adagrad"
    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.05
    initial_accumulator: NonNegative = 0.1
    epsilon: NonNegative = 1e-7
    beta1: Decay = 0.9
    beta2: Decay = 0.999
    l1: NonNegative = 0.0
    l2: NonNegative = 0.0
    beta: NonNegative = 1.0
    accumulate: Literal["occurrences", "sums"] = "sums"

    @property
    def uses_occurrence_squares(self) -> bool:
        """Whether a step needs the sum of an id's squared per-occurrence gradients."""
        return self.kind in ("adagrad", "ftrl") and self.accumulate == "occurrences"

    @property
    def state_width_per_dim(self) -> int:
        """Floats of optimizer state per embedding element."""
        return {"sgd": 0, "adagrad": 1, "ftrl": 2, "adam": 2}[self.kind]

    def state_width(self, dim: int) -> int:
        """Floats of optimizer state per row (adam also keeps the row's step count)."""
        return self.state_width_per_dim * dim + (1 if self.kind == "adam" else 0)


class AdmissionConfig(ConfigModel):
    """Which new ids get a row.

    Attributes:
        filter: "none" (admit at first sight), "counting" (exact occurrence counts: admit at
            the `threshold`-th occurrence) or "probabilistic" (the paper's stateless filter:
            each occurrence admits with probability p = 1 - 0.05 ** (1 / threshold), so an id
            is admitted by its threshold-th occurrence with probability 0.95).
        threshold: occurrences needed (1..2**30); 1 admits at first sight.
    """

    filter: Literal["none", "counting", "probabilistic"] = "none"
    threshold: Annotated[int, Field(ge=1, le=2**30)] = 1


class TableConfig(ConfigModel):
    """One embedding table.

    Attributes:
        name: unique table name.
        dim: embedding dimension (1..4096).
        initializer: how new rows start.
        optimizer: the sparse optimizer.
        admission: the admission filter.
        expire_after: seconds (of data time) without an update after which a row is
            evicted; None keeps rows forever.
        seed: initializer seed (rows re-created with the same seed start identical).
    """

    name: Annotated[str, Field(min_length=1, max_length=256)]
    dim: Annotated[int, Field(ge=1, le=4096)] = 16
    initializer: InitializerConfig = InitializerConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    admission: AdmissionConfig = AdmissionConfig()
    expire_after: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    seed: int = 0

