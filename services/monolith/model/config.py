"""The model config: one YAML file every service reads.

```yaml
slots:                      # the feature slots: one collisionless table each
  - name: user_id
    source: user_id         # the example column it reads (default: the name)
    multi_valued: false     # several ids per example, mean-pooled
    dim: 16
    initializer: {kind: uniform, scale: 0.05}
    optimizer: {kind: adagrad, learning_rate: 0.05}
    admission: {filter: counting, threshold: 1}
    expire_after: null
    bias:                   # optional per-id bias term: a dim-1 table with its own optimizer
      optimizer: {kind: adagrad, learning_rate: 0.3}
model:
  kind: deepfm              # deepfm (bias + FM + MLP) or mlp (bias + MLP)
  hidden_units: [64, 32]
  activation: relu
  optimizer: {kind: adam, learning_rate: 0.001}   # the dense tower's optimizer (dense-PS)
training:
  batch_size: 256           # examples per step when training on history (batch mode)
  online_batch_size: 16     # examples per step when streaming (online mode): smaller = fresher
  dense_refresh_steps: 1    # trainers pull dense parameters every k steps
  negative_sample_rate: 1.0 # fraction of negatives kept in training data (serving corrects)
```

Every problem raises `ConfigError` naming the field path, e.g. `model.hidden_units[1]`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from typing import Any, Mapping

import yaml

from monolith.dense_ps.optimizers import DenseOptimizerConfig, dense_optimizer_from_dict
from monolith.embedding.config import (
    ConfigError,
    InitializerConfig,
    OptimizerConfig,
    SlotConfig,
    slot_from_dict,
    slots_from_list,
)

MODEL_KINDS = ("deepfm", "mlp")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")
BIAS_SUFFIX = "/bias"


@dataclasses.dataclass(frozen=True)
class FeatureSlot:
    """A feature as the model sees it: its table, its data source, its optional bias table.

    Attributes:
        table: the embedding table's config.
        source: the example column the ids come from.
        multi_valued: whether an example may hold several ids (mean-pooled).
        bias: the dim-1 bias table's config, or None.
    """

    table: SlotConfig
    source: str
    multi_valued: bool
    bias: SlotConfig | None

    @property
    def name(self) -> str:
        return self.table.name


@dataclasses.dataclass(frozen=True)
class DenseModelConfig:
    """The dense tower.

    Attributes:
        kind: "deepfm" (per-slot bias + FM interactions + MLP) or "mlp" (bias + MLP).
        hidden_units: MLP layer widths.
        activation: MLP activation.
        optimizer: the dense optimizer, applied by the dense-PS.
    """

    kind: str = "deepfm"
    hidden_units: tuple[int, ...] = (64, 32)
    activation: str = "relu"
    optimizer: DenseOptimizerConfig = DenseOptimizerConfig()


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How trainers step.

    Attributes:
        batch_size: examples per step when training on stored history (batch mode).
        online_batch_size: examples per step when training on the stream (online mode).
            Events of a batch are all scored with the parameters from before it, so small
            online batches let the model react within a user's session.
        dense_refresh_steps: pull dense parameters from the dense-PS every k steps.
        seed: seed of the dense parameters' initial values.
        negative_sample_rate: the fraction of negatives the training data keeps (the
            sample-joiner down-samples them); serving corrects the log-odds by log(rate).
    """

    batch_size: int = 256
    online_batch_size: int = 256
    dense_refresh_steps: int = 1
    seed: int = 0
    negative_sample_rate: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything about the model: slots, dense tower, training."""

    features: tuple[FeatureSlot, ...]
    model: DenseModelConfig = DenseModelConfig()
    training: TrainingConfig = TrainingConfig()

    def tables(self) -> tuple[SlotConfig, ...]:
        """Every embedding table the PS holds: each slot's, then each bias table."""
        return tuple(f.table for f in self.features) + tuple(f.bias for f in self.features if f.bias)

    def table_dims(self) -> dict[str, int]:
        """Embedding dimension of each table, by name."""
        return {t.name: t.dim for t in self.tables()}


def _fail(path: str, problem: str) -> None:
    raise ConfigError(f"{path}: {problem}")


def _mapping(raw: Any, path: str, known: set[str]) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        _fail(path, f"must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - known)
    if unknown:
        _fail(path, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return raw


def _positive_int(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(path, f"must be an integer >= 1, got {value!r}")
    return value


def _feature(raw: Mapping[str, Any], table: SlotConfig, path: str) -> FeatureSlot:
    source = raw.get("source", table.name)
    if not isinstance(source, str) or not source:
        _fail(f"{path}.source", f"must be a non-empty string, got {source!r}")
    multi = raw.get("multi_valued", False)
    if not isinstance(multi, bool):
        _fail(f"{path}.multi_valued", f"must be true or false, got {multi!r}")
    bias = None
    if raw.get("bias") is not None:
        spec = _mapping(raw["bias"], f"{path}.bias", {"optimizer", "initializer"})
        bias_raw = {
            "name": table.name + BIAS_SUFFIX,
            "dim": 1,
            "initializer": spec.get("initializer", {"kind": "zeros"}),
            "optimizer": spec.get("optimizer", {"kind": "ftrl", "learning_rate": 0.05}),
            "admission": dataclasses.asdict(table.admission),
            "expire_after": table.expire_after,
            "seed": table.seed,
        }
        bias = slot_from_dict(bias_raw, f"{path}.bias")
    return FeatureSlot(table=table, source=source, multi_valued=multi, bias=bias)


def model_config_from_dict(raw: Any) -> ModelConfig:
    """Builds and validates a ModelConfig from parsed YAML."""
    top = _mapping(raw, "config", {"slots", "model", "training"})
    if "slots" not in top:
        _fail("slots", "is required")
    tables = slots_from_list(top["slots"], "slots", ignore=frozenset({"source", "multi_valued", "bias"}))
    features = tuple(_feature(r, t, f"slots[{i}]") for i, (r, t) in enumerate(zip(top["slots"], tables)))
    bias_tables = {f.bias.name: i for i, f in enumerate(features) if f.bias is not None}
    for i, feature in enumerate(features):
        if feature.name in bias_tables:
            _fail(f"slots[{i}].name", f"{feature.name!r} is the name of slots[{bias_tables[feature.name]}]'s bias table")

    m = _mapping(top.get("model"), "model", {"kind", "hidden_units", "activation", "optimizer"})
    kind = m.get("kind", "deepfm")
    if kind not in MODEL_KINDS:
        _fail("model.kind", f"must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    hidden = m.get("hidden_units", [64, 32])
    if not isinstance(hidden, list):
        _fail("model.hidden_units", f"must be a list of layer widths, got {hidden!r}")
    hidden_units = tuple(_positive_int(h, f"model.hidden_units[{i}]") for i, h in enumerate(hidden))
    activation = m.get("activation", "relu")
    if activation not in ACTIVATIONS:
        _fail("model.activation", f"must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    optimizer = dense_optimizer_from_dict(m.get("optimizer"), "model.optimizer")
    if kind == "deepfm":
        dims = {f.table.dim for f in features}
        if len(dims) > 1:
            _fail("slots", f"deepfm's FM term needs one embedding dim for every slot, got {sorted(dims)}")
    model = DenseModelConfig(kind=kind, hidden_units=hidden_units, activation=activation, optimizer=optimizer)

    t = _mapping(
        top.get("training"),
        "training",
        {"batch_size", "online_batch_size", "dense_refresh_steps", "seed", "negative_sample_rate"},
    )
    seed = t.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        _fail("training.seed", f"must be an integer, got {seed!r}")
    rate = t.get("negative_sample_rate", 1.0)
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= 1:
        _fail("training.negative_sample_rate", f"must be a number in (0, 1], got {rate!r}")
    training = TrainingConfig(
        batch_size=_positive_int(t.get("batch_size", 256), "training.batch_size"),
        online_batch_size=_positive_int(
            t.get("online_batch_size", t.get("batch_size", 256)), "training.online_batch_size"
        ),
        dense_refresh_steps=_positive_int(t.get("dense_refresh_steps", 1), "training.dense_refresh_steps"),
        seed=seed,
        negative_sample_rate=float(rate),
    )
    return ModelConfig(features=features, model=model, training=training)


def load_model_config(path: str) -> ModelConfig:
    """Reads and validates a model config YAML file.

    Raises:
        ConfigError: the file is missing or not YAML, or a field is invalid (named).
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return model_config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


__all__ = [
    "ConfigError",
    "DenseModelConfig",
    "FeatureSlot",
    "InitializerConfig",
    "ModelConfig",
    "OptimizerConfig",
    "TrainingConfig",
    "default_config_path",
    "load_model_config",
    "model_config_from_dict",
]


def default_config_path() -> str:
    """The shipped MovieLens-100k model config."""
    return str(importlib.resources.files("monolith.model") / "movielens.yaml")
