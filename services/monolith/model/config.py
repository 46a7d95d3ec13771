"""The model config: one YAML file every service reads.

```yaml
features:                   # what the model reads; each feature owns one collisionless table
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
  online_batch_size: 16     # examples per step of the in-process stream protocol (bench train); the live
                            # online trainer takes every sample delivered instead (its --max-batch caps it)
  dense_refresh_steps: 1    # trainers pull dense parameters every k steps
  negative_sample_rate: 1.0 # fraction of negatives kept in training data (serving corrects)
item_feature: movie_id      # the input naming the candidate: impressions and actions join on it
```

Words: a *feature* is what this file declares and a request carries; a *table* is what an
embedding-PS shard holds. A feature owns the table of its name and, with `bias`, a dim-1
table named `<feature>/bias`. Every problem raises `ConfigError` naming the field path,
e.g. `model.hidden_units[1]`.
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import Field

from monolith.common.config import LIST_AS_TUPLE, ConfigModel, IntTuple, parse_config
from monolith.common.errors import ConfigError
from monolith.embedding.config import InitializerConfig, OptimizerConfig, TableConfig

BIAS_SUFFIX = "/bias"
PositiveInt = Annotated[int, Field(ge=1)]


class BiasConfig(ConfigModel):
    """A feature's per-id bias term: a dim-1 table sharing the feature's admission and expiry.

    Attributes:
        initializer: how new bias terms start (default zeros).
        optimizer: the bias table's sparse optimizer (default FTRL, learning rate 0.05).
    """

    initializer: InitializerConfig = InitializerConfig(kind="zeros")
    optimizer: OptimizerConfig = OptimizerConfig(kind="ftrl", learning_rate=0.05)


class FeatureConfig(TableConfig):
    """A feature as the model sees it: its table's config, plus where its ids come from.

    Attributes (besides the table's: name, dim, initializer, optimizer, admission,
    expire_after, seed; the feature's name is its table's name):
        source: the example column (and Predict input) the ids come from; default the name.
        multi_valued: whether an example may hold several ids (mean-pooled).
        bias: the per-id bias term, or None for none.
    """

    model_config = pydantic.ConfigDict(ignored_types=(functools.cached_property,))

    # A table name is at most 256 characters; the bias table's adds "/bias".
    name: Annotated[str, Field(min_length=1, max_length=256 - len(BIAS_SUFFIX))]
    source: Annotated[str, Field(min_length=1, max_length=256)]
    multi_valued: bool = False
    bias: BiasConfig | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _source_defaults_to_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("source") is None and isinstance(data.get("name"), str):
            return {**data, "source": data["name"]}
        return data

    @functools.cached_property
    def table(self) -> TableConfig:
        """The feature's embedding table."""
        return TableConfig(**{field: getattr(self, field) for field in TableConfig.model_fields})

    @functools.cached_property
    def bias_table(self) -> TableConfig | None:
        """The feature's dim-1 bias table, or None."""
        if self.bias is None:
            return None
        return self.table.model_copy(
            update={"name": self.name + BIAS_SUFFIX, "dim": 1, "initializer": self.bias.initializer,
                    "optimizer": self.bias.optimizer}
        )  # fmt: skip


class DenseOptimizerConfig(ConfigModel):
    """The dense tower's optimizer, applied by the dense-PS to whole tensors.

    Attributes:
        kind: "sgd", "adagrad" or "adam".
        learning_rate: step size (> 0).
        beta1: adam's first-moment decay, in [0, 1).
        beta2: adam's second-moment decay, in [0, 1).
        epsilon: added to denominators of adagrad and adam (> 0: a zero gradient on a
            fresh Adam tensor would otherwise divide 0 by 0).
        initial_accumulator: adagrad's starting accumulator (>= 0).
    """

    kind: Literal["sgd", "adagrad", "adam"] = "adam"
    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.001
    beta1: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.999
    epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-7
    initial_accumulator: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.1


class DenseModelConfig(ConfigModel):
    """The dense tower.

    Attributes:
        kind: "deepfm" (per-feature bias + FM interactions + MLP) or "mlp" (bias + MLP).
        hidden_units: MLP layer widths.
        activation: MLP activation.
        optimizer: the dense optimizer, applied by the dense-PS.
    """

    kind: Literal["deepfm", "mlp"] = "deepfm"
    hidden_units: IntTuple = (64, 32)
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"
    optimizer: DenseOptimizerConfig = DenseOptimizerConfig()


class TrainingConfig(ConfigModel):
    """How trainers step.

    Attributes:
        batch_size: examples per step when training on stored history (batch mode).
        online_batch_size: examples per step of the in-process progressive protocol
            (`trainer/evaluation.py`: each batch scored, then trained); default batch_size.
            Events of a batch are all scored with the parameters from before it, so small
            online batches let the model react within a user's session. The live online
            trainer's steps are set by the load instead: each takes every sample delivered,
            up to its `--max-batch` (a trickle trains sample by sample).
        dense_refresh_steps: pull dense parameters from the dense-PS every k steps.
        seed: seed of the dense parameters' initial values.
        negative_sample_rate: the fraction of negatives the training data keeps (the
            sample-joiner down-samples them); serving corrects the log-odds by log(rate).
    """

    batch_size: PositiveInt = 256
    online_batch_size: PositiveInt = 256
    dense_refresh_steps: PositiveInt = 1
    seed: int = 0
    negative_sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0

    @pydantic.model_validator(mode="before")
    @classmethod
    def _online_batch_defaults_to_batch(cls, data: Any) -> Any:
        if isinstance(data, dict) and "online_batch_size" not in data and "batch_size" in data:
            return {**data, "online_batch_size": data["batch_size"]}
        return data


class ModelConfig(ConfigModel):
    """Everything about the model: features, dense tower, training."""

    model_config = pydantic.ConfigDict(ignored_types=(functools.cached_property,))

    features: Annotated[tuple[FeatureConfig, ...], LIST_AS_TUPLE, Field(min_length=1)]
    model: DenseModelConfig = DenseModelConfig()
    training: TrainingConfig = TrainingConfig()
    # The Predict input (a feature source) whose value names the candidate: model-serving
    # logs one impression per candidate keyed by (request_id, this value), and actions
    # name the item they were taken on by the same value. None: impressions are not logged.
    item_feature: str | None = None

    @pydantic.model_validator(mode="after")
    def _check_across_features(self) -> ModelConfig:
        names: dict[str, int] = {}
        for i, feature in enumerate(self.features):
            if feature.name in names:
                raise ValueError(f"features[{i}].name: duplicate feature name {feature.name!r}")
            names[feature.name] = i
        sources: dict[str, int] = {}
        for i, feature in enumerate(self.features):
            if feature.source in sources:
                raise ValueError(
                    f"features[{i}].source: {feature.source!r} is already the source of features[{sources[feature.source]}]; "
                    "each Predict input and example column feeds one feature"
                )
            sources[feature.source] = i
        for i, feature in enumerate(self.features):
            if feature.bias is not None and feature.bias_table.name in names:  # type: ignore[union-attr]
                j = names[feature.bias_table.name]  # type: ignore[union-attr]
                raise ValueError(f"features[{j}].name: {self.features[j].name!r} is the name of features[{i}]'s bias table")
        if self.item_feature is not None:
            feature = next((f for f in self.features if f.source == self.item_feature), None)
            if feature is None:
                raise ValueError(
                    f"item_feature: {self.item_feature!r} is not the source of any feature; "
                    f"sources are {', '.join(sorted(sources))}"
                )
            if feature.multi_valued:
                raise ValueError(f"item_feature: {self.item_feature!r} is multi-valued; an item has one id")
        if self.model.kind == "deepfm" and len({f.dim for f in self.features}) > 1:
            dims = sorted({f.dim for f in self.features})
            raise ValueError(f"features: deepfm's FM term needs one embedding dim for every feature, got {dims}")
        return self

    def tables(self) -> tuple[TableConfig, ...]:
        """Every embedding table the PS holds: each feature's, then each bias table."""
        return tuple(f.table for f in self.features) + tuple(f.bias_table for f in self.features if f.bias_table)

    def table_dims(self) -> dict[str, int]:
        """Embedding dimension of each table, by name."""
        return {t.name: t.dim for t in self.tables()}

    def occurrence_tables(self) -> frozenset[str]:
        """The tables whose optimizer accumulates per-occurrence squares (the client sends them)."""
        return frozenset(t.name for t in self.tables() if t.optimizer.uses_occurrence_squares)


def model_config_from_dict(raw: Any) -> ModelConfig:
    """Builds and validates a ModelConfig from parsed YAML."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: must be a mapping with features, model and training, got {type(raw).__name__}")
    return parse_config(ModelConfig, raw)


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


def default_config_path() -> str:
    """The shipped MovieLens-100k model config."""
    return str(importlib.resources.files("monolith.model") / "movielens.yaml")
