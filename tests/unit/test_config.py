"""Slot configuration: every rejection names the field path and the problem."""

from __future__ import annotations

import math
from typing import Any

import pytest

from monolith.embedding.config import (
    AdmissionConfig,
    ConfigError,
    InitializerConfig,
    OptimizerConfig,
    SlotConfig,
    slot_from_dict,
    slots_from_list,
)


def test_defaults_are_valid() -> None:
    slot = SlotConfig(name="user_id")

    assert slot.dim == 16
    assert slot.initializer == InitializerConfig("uniform", 0.05)
    assert slot.optimizer.kind == "adagrad"
    assert slot.admission == AdmissionConfig("none", 1)
    assert slot.expire_after is None


@pytest.mark.parametrize(
    ("kind", "dim", "width"),
    [("sgd", 8, 0), ("adagrad", 8, 8), ("ftrl", 8, 16), ("adam", 8, 17), ("adam", 1, 3)],
)
def test_state_width(kind: str, dim: int, width: int) -> None:
    assert OptimizerConfig(kind=kind).state_width(dim) == width


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": 7}, "name"),
        ({"dim": 0}, "dim"),
        ({"dim": 4097}, "dim"),
        ({"dim": 1.0}, "dim"),
        ({"dim": True}, "dim"),
        ({"initializer": InitializerConfig(kind="xavier")}, "initializer.kind"),
        ({"initializer": InitializerConfig(scale=-0.1)}, "initializer.scale"),
        ({"initializer": InitializerConfig(scale=math.inf)}, "initializer.scale"),
        ({"initializer": InitializerConfig(scale="0.1")}, "initializer.scale"),  # type: ignore[arg-type]
        ({"optimizer": OptimizerConfig(kind="rmsprop")}, "optimizer.kind"),
        ({"optimizer": OptimizerConfig(learning_rate=0.0)}, "optimizer.learning_rate"),
        ({"optimizer": OptimizerConfig(learning_rate=math.nan)}, "optimizer.learning_rate"),
        ({"optimizer": OptimizerConfig(initial_accumulator=-1.0)}, "optimizer.initial_accumulator"),
        ({"optimizer": OptimizerConfig(epsilon=math.inf)}, "optimizer.epsilon"),
        ({"optimizer": OptimizerConfig(l1=-0.5)}, "optimizer.l1"),
        ({"optimizer": OptimizerConfig(l2=True)}, "optimizer.l2"),  # type: ignore[arg-type]
        ({"optimizer": OptimizerConfig(beta=-1.0)}, "optimizer.beta"),
        ({"optimizer": OptimizerConfig(beta1=1.0)}, "optimizer.beta1"),
        ({"optimizer": OptimizerConfig(beta2=-0.1)}, "optimizer.beta2"),
        ({"admission": AdmissionConfig(filter="bloom")}, "admission.filter"),
        ({"admission": AdmissionConfig(threshold=0)}, "admission.threshold"),
        ({"admission": AdmissionConfig(threshold=2**30 + 1)}, "admission.threshold"),
        ({"admission": AdmissionConfig(threshold=2.0)}, "admission.threshold"),  # type: ignore[arg-type]
        ({"expire_after": 0}, "expire_after"),
        ({"expire_after": -5.0}, "expire_after"),
        ({"expire_after": math.inf}, "expire_after"),
        ({"seed": 1.5}, "seed"),
        ({"seed": False}, "seed"),
    ],
)
def test_slot_config_rejects_bad_field(kwargs: dict[str, Any], field: str) -> None:
    kwargs = {"name": "s", **kwargs}

    with pytest.raises(ConfigError) as info:
        SlotConfig(**kwargs)

    assert str(info.value).startswith(f"{field}: ")


def test_boundary_values_are_accepted() -> None:
    slot = SlotConfig(
        name="s",
        dim=4096,
        initializer=InitializerConfig("zeros", 0.0),
        optimizer=OptimizerConfig("ftrl", initial_accumulator=0.0, l1=0.0, beta1=0.0, beta2=0.0),
        admission=AdmissionConfig("counting", 2**30),
        expire_after=1e-3,
        seed=-3,
    )

    assert slot.dim == 4096


def _slot(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "dim": 4, **extra}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([_slot("a"), _slot("b", optimizer={"learning_rate": -1})], "slots[1].optimizer.learning_rate: "),
        ([_slot("a", dim="16")], "slots[0].dim: "),
        ([_slot("a"), _slot("b"), _slot("c", initializer={"kind": "he"})], "slots[2].initializer.kind: "),
        ([_slot("a", admission={"filter": "counting", "threshold": 0})], "slots[0].admission.threshold: "),
        ([_slot("a", expire_after="1d")], "slots[0].expire_after: "),
        ([{"dim": 4}], "slots[0].name: is required"),
        ([_slot("a"), "b"], "slots[1]: must be a mapping"),
        ([_slot("a", optimizer=0.1)], "slots[0].optimizer: must be a mapping"),
        ([_slot("a"), _slot("b"), _slot("a")], "slots[2].name: duplicate slot name 'a'"),
        ([], "slots: must be a non-empty list"),
        ({"name": "a"}, "slots: must be a non-empty list"),
    ],
)
def test_slots_from_list_names_the_field(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        slots_from_list(raw)

    assert message in str(info.value)
    assert str(info.value).startswith(message.split(":")[0] + ":")


def test_unknown_keys_are_rejected_and_listed() -> None:
    with pytest.raises(ConfigError) as info:
        slots_from_list([_slot("a"), _slot("b", dimension=8, colour="red")])

    message = str(info.value)
    assert message.startswith("slots[1]: unknown field(s) colour, dimension")
    assert "known:" in message and "expire_after" in message


def test_unknown_nested_keys_are_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        slots_from_list([_slot("a", optimizer={"kind": "sgd", "lr": 0.1})])

    assert str(info.value).startswith("slots[0].optimizer: unknown field(s) lr")


def test_keys_of_other_layers_are_ignored_only_when_asked() -> None:
    raw = [_slot("a", source="user_id", multi_valued=True)]

    assert slots_from_list(raw, ignore=frozenset({"source", "multi_valued"}))[0].name == "a"
    with pytest.raises(ConfigError, match=r"slots\[0\]: unknown field\(s\) multi_valued, source"):
        slots_from_list(raw)


def test_full_slot_is_parsed() -> None:
    raw = {
        "name": "movie",
        "dim": 8,
        "initializer": {"kind": "normal", "scale": 0.01},
        "optimizer": {"kind": "ftrl", "learning_rate": 0.1, "l1": 0.5, "l2": 1.0, "beta": 0.5},
        "admission": {"filter": "probabilistic", "threshold": 4},
        "expire_after": 3600,
        "seed": 9,
    }

    slot = slot_from_dict(raw, "slots[0]")

    assert slot == SlotConfig(
        name="movie",
        dim=8,
        initializer=InitializerConfig("normal", 0.01),
        optimizer=OptimizerConfig("ftrl", learning_rate=0.1, l1=0.5, l2=1.0, beta=0.5),
        admission=AdmissionConfig("probabilistic", 4),
        expire_after=3600,
        seed=9,
    )


def test_null_nested_sections_take_defaults() -> None:
    slot = slot_from_dict({"name": "a", "initializer": None, "optimizer": None, "admission": None}, "slots[0]")

    assert slot == SlotConfig(name="a")
