"""The model config: the shipped default loads, and every rejection names its field path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from monolith.embedding.config import AdmissionConfig, InitializerConfig, OptimizerConfig
from monolith.common.errors import ConfigError
from monolith.model.config import (
    DenseOptimizerConfig,
    ModelConfig,
    default_config_path,
    load_model_config,
    model_config_from_dict,
)

MOVIELENS_FEATURES = ("user_id", "movie_id", "age", "gender", "occupation", "zip", "genres")


def minimal() -> dict[str, Any]:
    """A small valid config that each bad case breaks in one place."""
    return {
        "features": [
            {"name": "user_id", "dim": 4, "bias": {"optimizer": {"kind": "adagrad", "learning_rate": 0.3}}},
            {"name": "movie_id", "dim": 4},
            {"name": "genres", "dim": 4, "multi_valued": True},
        ],
        "model": {"kind": "deepfm", "hidden_units": [8, 4], "activation": "relu",
                  "optimizer": {"kind": "adam", "learning_rate": 0.001}},  # fmt: skip
        "training": {"batch_size": 32, "online_batch_size": 4, "dense_refresh_steps": 1, "seed": 3},
    }


# --------------------------------------------------------------------------- the shipped config


@pytest.fixture(scope="module")
def shipped() -> ModelConfig:
    return load_model_config(default_config_path())


def test_the_shipped_config_has_seven_features_each_with_a_bias_table(shipped: ModelConfig) -> None:
    tables = shipped.tables()

    assert tuple(f.name for f in shipped.features) == MOVIELENS_FEATURES
    assert tuple(f.source for f in shipped.features) == MOVIELENS_FEATURES
    assert len(tables) == 14
    assert tuple(t.name for t in tables) == MOVIELENS_FEATURES + tuple(f"{n}/bias" for n in MOVIELENS_FEATURES)
    assert len({t.name for t in tables}) == 14
    assert shipped.table_dims() == {**{n: 16 for n in MOVIELENS_FEATURES},
                                    **{f"{n}/bias": 1 for n in MOVIELENS_FEATURES}}  # fmt: skip


def test_the_shipped_config_values(shipped: ModelConfig) -> None:
    multi = {f.name: f.multi_valued for f in shipped.features}
    user = shipped.features[0]

    assert multi == {n: n == "genres" for n in MOVIELENS_FEATURES}
    assert user.table.initializer == InitializerConfig(kind="normal", scale=0.01)
    assert user.table.optimizer == OptimizerConfig(kind="adagrad", learning_rate=0.1, initial_accumulator=0.1)
    assert user.bias is not None
    assert user.bias.optimizer == OptimizerConfig(kind="adagrad", learning_rate=0.3, initial_accumulator=0.1)
    assert user.bias.initializer.kind == "zeros"  # the default of a bias section
    assert (shipped.model.kind, shipped.model.hidden_units, shipped.model.activation) == ("deepfm", (64, 32), "relu")
    assert shipped.model.optimizer == DenseOptimizerConfig(kind="adam", learning_rate=0.0003)
    assert (shipped.training.batch_size, shipped.training.online_batch_size) == (256, 1)
    assert (shipped.training.dense_refresh_steps, shipped.training.seed) == (1, 0)


def test_the_default_path_points_at_a_readable_file() -> None:
    assert Path(default_config_path()).is_file()
    assert Path(default_config_path()).name == "movielens.yaml"


# --------------------------------------------------------------------------- defaults


def test_a_config_of_features_only_takes_every_default() -> None:
    config = model_config_from_dict({"features": [{"name": "user_id"}]})

    (feature,) = config.features
    assert (feature.source, feature.multi_valued, feature.bias) == ("user_id", False, None)
    assert config.tables() == (feature.table,)
    assert (config.model.kind, config.model.hidden_units, config.model.activation) == ("deepfm", (64, 32), "relu")
    assert config.model.optimizer == DenseOptimizerConfig()
    assert (config.training.batch_size, config.training.online_batch_size) == (256, 256)
    assert (config.training.dense_refresh_steps, config.training.seed) == (1, 0)


def test_online_batch_size_defaults_to_batch_size() -> None:
    raw = minimal()
    del raw["training"]["online_batch_size"]

    training = model_config_from_dict(raw).training

    assert (training.batch_size, training.online_batch_size) == (32, 32)


def test_source_names_the_column_and_the_feature_names_the_table() -> None:
    raw = minimal()
    raw["features"][1]["source"] = "item"

    config = model_config_from_dict(raw)

    assert (config.features[1].name, config.features[1].source) == ("movie_id", "item")


def test_a_bias_table_inherits_admission_expiry_and_seed() -> None:
    raw = {"features": [{"name": "user_id", "admission": {"filter": "counting", "threshold": 3},
                      "expire_after": 60.0, "seed": 7, "bias": {}}]}  # fmt: skip

    bias = model_config_from_dict(raw).features[0].bias_table

    assert bias is not None
    assert (bias.name, bias.dim) == ("user_id/bias", 1)
    assert bias.admission == AdmissionConfig(filter="counting", threshold=3)
    assert (bias.expire_after, bias.seed) == (60.0, 7)
    assert bias.initializer.kind == "zeros"
    assert (bias.optimizer.kind, bias.optimizer.learning_rate) == ("ftrl", 0.05)


def test_mlp_accepts_features_of_different_dims() -> None:
    raw = minimal()
    raw["model"]["kind"] = "mlp"
    raw["features"][2]["dim"] = 2

    config = model_config_from_dict(raw)

    assert config.table_dims() == {"user_id": 4, "movie_id": 4, "genres": 2, "user_id/bias": 1}


# --------------------------------------------------------------------------- rejections


def _set(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(minimal())
    target: Any = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return raw


def _delete(path: tuple[Any, ...]) -> dict[str, Any]:
    raw = copy.deepcopy(minimal())
    target: Any = raw
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return raw


BAD: list[tuple[str, Any, str]] = [
    ("unknown top-level key", _set(("serving",), {}), "serving: unknown field"),
    ("not a mapping", [1, 2], "config: must be a mapping with features, model and training, got list"),
    ("empty", None, "config: must be a mapping"),
    ("missing features", _delete(("features",)), "features: is required"),
    ("the old word", {"slots": [{"name": "a"}]}, "features: is required; slots: unknown field"),
    ("empty features", _set(("features",), []), "features: value should have at least 1 item"),
    ("bad feature dim", _set(("features", 2, "dim"), 0), "features[2].dim: input should be greater than or equal to 1, got 0"),
    ("feature without name", _delete(("features", 1, "name")), "features[1].name: is required"),
    ("unknown feature key", _set(("features", 1, "pooling"), "sum"), "features[1].pooling: unknown field"),
    ("duplicate feature", _set(("features", 1, "name"), "user_id"), "features[1].name: duplicate feature name"),
    ("duplicate source", _set(("features", 1, "source"), "user_id"),
     "features[1].source: 'user_id' is already the source of features[0]"),
    ("name too long for its bias table", _set(("features", 0, "name"), "u" * 252),
     "features[0].name: string should have at most 251 characters"),
    ("empty source", _set(("features", 0, "source"), ""), "features[0].source: string should have at least 1 character"),
    ("multi_valued not bool", _set(("features", 2, "multi_valued"), "yes"),
     "features[2].multi_valued: input should be a valid boolean, got 'yes'"),
    ("bias unknown key", _set(("features", 0, "bias", "dim"), 4), "features[0].bias.dim: unknown field"),
    ("bias not a mapping", _set(("features", 0, "bias"), True), "features[0].bias: input should be a valid dictionary"),
    ("model not a mapping", _set(("model",), [64]), "model: input should be a valid dictionary"),
    ("model unknown key", _set(("model", "layers"), [4]), "model.layers: unknown field"),
    ("model.kind", _set(("model", "kind"), "wide_deep"), "model.kind: input should be 'deepfm' or 'mlp', got 'wide_deep'"),
    ("hidden not a list", _set(("model", "hidden_units"), 64), "model.hidden_units: input should be a valid tuple"),
    ("hidden zero", _set(("model", "hidden_units"), [8, 0]),
     "model.hidden_units[1]: input should be greater than or equal to 1, got 0"),
    ("hidden float", _set(("model", "hidden_units"), [8.0]), "model.hidden_units[0]: input should be a valid integer"),
    ("hidden bool", _set(("model", "hidden_units"), [True]), "model.hidden_units[0]: input should be a valid integer"),
    ("activation", _set(("model", "activation"), "swish"),
     "model.activation: input should be 'relu', 'tanh', 'sigmoid' or 'gelu', got 'swish'"),
    ("optimizer.kind", _set(("model", "optimizer", "kind"), "rmsprop"), "model.optimizer.kind: input should be"),
    ("optimizer.learning_rate", _set(("model", "optimizer", "learning_rate"), 0),
     "model.optimizer.learning_rate: input should be greater than 0, got 0"),
    ("optimizer unknown key", _set(("model", "optimizer", "lr"), 0.1), "model.optimizer.lr: unknown field"),
    ("deepfm unequal dims", _set(("features", 1, "dim"), 8),
     "features: deepfm's FM term needs one embedding dim for every feature, got [4, 8]"),
    ("training not a mapping", _set(("training",), 5), "training: input should be a valid dictionary"),
    ("training unknown key", _set(("training", "epochs"), 2), "training.epochs: unknown field"),
    ("batch_size 0", _set(("training", "batch_size"), 0),
     "training.batch_size: input should be greater than or equal to 1, got 0"),
    ("batch_size str", _set(("training", "batch_size"), "256"), "training.batch_size: input should be a valid integer"),
    ("online_batch_size", _set(("training", "online_batch_size"), -1),
     "training.online_batch_size: input should be greater than or equal to 1, got -1"),
    ("dense_refresh_steps", _set(("training", "dense_refresh_steps"), 0), "training.dense_refresh_steps: input should"),
    ("seed float", _set(("training", "seed"), 1.5), "training.seed: input should be a valid integer, got 1.5"),
    ("seed bool", _set(("training", "seed"), True), "training.seed: input should be a valid integer, got True"),
    ("negative_sample_rate", _set(("training", "negative_sample_rate"), 0),
     "training.negative_sample_rate: input should be greater than 0, got 0"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_config_names_the_field(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        model_config_from_dict(raw)

    assert str(info.value).startswith(message.split(":")[0] + ":"), str(info.value)
    assert message in str(info.value)


# A problem *inside* a feature's bias section is reported at the field the user wrote,
# "features[0].bias.optimizer.kind" (regression: it was once "slots[0].bias[0]...").
BAD_BIAS: list[tuple[str, dict[str, Any], str]] = [
    ("bias optimizer.kind", {"optimizer": {"kind": "nope"}}, "features[0].bias.optimizer.kind: input should be"),
    ("bias optimizer unknown key", {"optimizer": {"lr": 1}}, "features[0].bias.optimizer.lr: unknown field"),
    ("bias initializer.kind", {"initializer": {"kind": "x"}}, "features[0].bias.initializer.kind: input should be"),
]


@pytest.mark.parametrize(("bias", "message"), [c[1:] for c in BAD_BIAS], ids=[c[0] for c in BAD_BIAS])
def test_a_bad_value_inside_a_bias_section_names_its_field(bias: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        model_config_from_dict(_set(("features", 0, "bias"), bias))

    assert str(info.value).startswith(message), str(info.value)


def test_a_feature_named_like_another_features_bias_table_is_rejected() -> None:
    # Feature "user_id" with a bias section makes a table "user_id/bias"; a second feature
    # literally named "user_id/bias" would list the name twice in tables(), and the PS and
    # the trainer's request dicts would silently merge the two tables (regression).
    raw = _set(("features", 1, "name"), "user_id/bias")

    with pytest.raises(ConfigError, match=r"features\[1\]\.name"):
        model_config_from_dict(raw)


# --------------------------------------------------------------------------- files


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(minimal()))

    config = load_model_config(str(path))

    assert config == model_config_from_dict(minimal())
    assert config.training.seed == 3


def test_a_missing_file_is_a_config_error_starting_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as info:
        load_model_config(str(path))

    assert str(info.value).startswith(f"{path}: cannot read")


def test_bad_yaml_is_a_config_error_starting_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("features: [\n  - name: user_id\n")

    with pytest.raises(ConfigError) as info:
        load_model_config(str(path))

    assert str(info.value).startswith(f"{path}: not valid YAML")


def test_a_bad_field_in_a_file_names_the_path_then_the_field(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(_set(("model", "hidden_units"), [8, 0])))

    with pytest.raises(ConfigError) as info:
        load_model_config(str(path))

    assert str(info.value).startswith(f"{path}: model.hidden_units[1]: input should be greater than or equal to 1")


def test_the_shipped_config_joins_on_movie_id(shipped: ModelConfig) -> None:
    assert shipped.item_feature == "movie_id"


@pytest.mark.parametrize(
    ("item_feature", "message"),
    [("nope", "item_feature: 'nope' is not the source of any feature"), ("genres", "is multi-valued")],
)
def test_item_feature_must_name_a_single_valued_source(item_feature: str, message: str) -> None:
    raw = {"features": [{"name": "movie_id", "dim": 4}, {"name": "genres", "dim": 4, "multi_valued": True}]}
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict({**raw, "item_feature": item_feature})
