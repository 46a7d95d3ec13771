"""Table configuration (pydantic): every rejection names the field path and the problem."""

from __future__ import annotations

import math
from typing import Any

import pydantic
import pytest

from monolith.common.config import parse_config
from monolith.common.errors import ConfigError
from monolith.embedding.config import AdmissionConfig, InitializerConfig, OptimizerConfig, TableConfig


def test_defaults_are_valid() -> None:
    table = TableConfig(name="user_id")

    assert table.dim == 16
    assert table.initializer == InitializerConfig(kind="uniform", scale=0.05)
    assert table.optimizer.kind == "adagrad"
    assert table.admission == AdmissionConfig(filter="none", threshold=1)
    assert table.expire_after is None


def test_configs_are_frozen_and_hashable() -> None:
    table = TableConfig(name="a")

    with pytest.raises(pydantic.ValidationError):
        table.dim = 8  # type: ignore[misc]
    assert hash(table) == hash(TableConfig(name="a"))


@pytest.mark.parametrize(
    ("kind", "dim", "width"),
    [("sgd", 8, 0), ("adagrad", 8, 8), ("ftrl", 8, 16), ("adam", 8, 17), ("adam", 1, 3)],
)
def test_state_width(kind: str, dim: int, width: int) -> None:
    assert OptimizerConfig(kind=kind).state_width(dim) == width


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": 7}, "name"),
        ({"name": "x" * 257}, "name"),
        ({"dim": 0}, "dim"),
        ({"dim": 4097}, "dim"),
        ({"dim": 1.0}, "dim"),
        ({"dim": True}, "dim"),
        ({"dim": "16"}, "dim"),
        ({"initializer": {"kind": "xavier"}}, "initializer.kind"),
        ({"initializer": {"scale": -0.1}}, "initializer.scale"),
        ({"initializer": {"scale": math.inf}}, "initializer.scale"),
        ({"initializer": {"scale": "0.1"}}, "initializer.scale"),
        ({"optimizer": {"kind": "rmsprop"}}, "optimizer.kind"),
        ({"optimizer": {"learning_rate": 0.0}}, "optimizer.learning_rate"),
        ({"optimizer": {"learning_rate": math.nan}}, "optimizer.learning_rate"),
        ({"optimizer": {"initial_accumulator": -1.0}}, "optimizer.initial_accumulator"),
        ({"optimizer": {"epsilon": math.inf}}, "optimizer.epsilon"),
        ({"optimizer": {"l1": -0.5}}, "optimizer.l1"),
        ({"optimizer": {"l2": True}}, "optimizer.l2"),
        ({"optimizer": {"beta": -1.0}}, "optimizer.beta"),
        ({"optimizer": {"beta1": 1.0}}, "optimizer.beta1"),
        ({"optimizer": {"beta2": -0.1}}, "optimizer.beta2"),
        ({"optimizer": 0.1}, "optimizer"),
        ({"admission": {"filter": "bloom"}}, "admission.filter"),
        ({"admission": {"threshold": 0}}, "admission.threshold"),
        ({"admission": {"threshold": 2**30 + 1}}, "admission.threshold"),
        ({"admission": {"threshold": 2.0}}, "admission.threshold"),
        ({"expire_after": 0}, "expire_after"),
        ({"expire_after": -5.0}, "expire_after"),
        ({"expire_after": math.inf}, "expire_after"),
        ({"expire_after": "1d"}, "expire_after"),
        ({"seed": 1.5}, "seed"),
        ({"seed": False}, "seed"),
    ],
)
def test_bad_field_is_named_with_its_path(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(TableConfig, {"name": "s", **raw}, "tables[3]")

    assert str(info.value).startswith(f"tables[3].{field}: ")
    assert "got " in str(info.value)


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(TableConfig, {"name": "s", "dim": 0, "optimizer": {"kind": "x"}}, "t")

    assert str(info.value).split("; ")[0].startswith("t.dim: ")
    assert str(info.value).split("; ")[1].startswith("t.optimizer.kind: ")


def test_unknown_and_missing_keys_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(TableConfig, {"dimension": 8, "optimizer": {"kind": "sgd", "lr": 0.1}}, "t")

    parts = str(info.value).split("; ")
    assert "t.name: is required" in parts
    assert "t.dimension: unknown field" in parts
    assert "t.optimizer.lr: unknown field" in parts


def test_long_values_are_cut_in_messages() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(TableConfig, {"name": "s", "initializer": {"kind": "k" * 100_000}})

    assert len(str(info.value)) < 500


def test_boundary_values_are_accepted() -> None:
    table = TableConfig(
        name="s",
        dim=4096,
        initializer=InitializerConfig(kind="zeros", scale=0.0),
        optimizer=OptimizerConfig(kind="ftrl", initial_accumulator=0.0, l1=0.0, beta1=0.0, beta2=0.0),
        admission=AdmissionConfig(filter="counting", threshold=2**30),
        expire_after=1e-3,
        seed=-3,
    )

    assert table.dim == 4096


def test_built_in_code_a_bad_value_raises_pydantics_error() -> None:
    with pytest.raises(pydantic.ValidationError):
        TableConfig(name="s", dim=0)


def test_full_table_is_parsed() -> None:
    raw = {
        "name": "movie",
        "dim": 8,
        "initializer": {"kind": "normal", "scale": 0.01},
        "optimizer": {"kind": "ftrl", "learning_rate": 0.1, "l1": 0.5, "l2": 1.0, "beta": 0.5},
        "admission": {"filter": "probabilistic", "threshold": 4},
        "expire_after": 3600,
        "seed": 9,
    }

    table = parse_config(TableConfig, raw)

    assert table == TableConfig(
        name="movie",
        dim=8,
        initializer=InitializerConfig(kind="normal", scale=0.01),
        optimizer=OptimizerConfig(kind="ftrl", learning_rate=0.1, l1=0.5, l2=1.0, beta=0.5),
        admission=AdmissionConfig(filter="probabilistic", threshold=4),
        expire_after=3600,
        seed=9,
    )
