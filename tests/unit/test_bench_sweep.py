"""`monolith bench sweep`'s grid: settings parsed, config fields overridden, points labelled;
bad settings refused with a message naming them."""

from __future__ import annotations

import argparse

import pytest
import yaml

from monolith.harness.bench.sweep import grid_points, override, parse_setting, run
from monolith.model.config import default_config_path


@pytest.fixture(scope="module")
def raw() -> dict:
    with open(default_config_path(), encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_a_setting_is_a_path_and_yaml_values() -> None:
    assert parse_setting("training.batch_size=8,256") == ("training.batch_size", [8, 256])
    assert parse_setting("features.*.optimizer.accumulate=sums") == ("features.*.optimizer.accumulate", ["sums"])
    for bad in ("training.batch_size", "=1", "training.batch_size="):
        with pytest.raises(ValueError, match="expected path=value"):
            parse_setting(bad)


def test_override_sets_one_feature_or_all_and_leaves_the_original(raw: dict) -> None:
    one = override(raw, "features.user_id.bias.optimizer.learning_rate", 0.9)
    every = override(raw, "features.*.optimizer.learning_rate", 0.2)

    lrs = {f["name"]: f["bias"]["optimizer"]["learning_rate"] for f in one["features"]}
    # The YAML anchor makes every feature share one dict; only the named one changed.
    assert lrs["user_id"] == 0.9 and {v for k, v in lrs.items() if k != "user_id"} == {0.3}
    assert {f["optimizer"]["learning_rate"] for f in every["features"]} == {0.2}
    assert {f["optimizer"]["learning_rate"] for f in raw["features"]} == {0.1}
    with pytest.raises(ValueError, match="no item named 'shoe_size'"):
        override(raw, "features.shoe_size.dim", 8)
    with pytest.raises(ValueError, match="is not a field of a mapping"):
        override(raw, "model.hidden_units.width", 8)


def test_the_grid_is_the_product_of_the_settings(raw: dict) -> None:
    points = grid_points(raw, [("training.batch_size", [8, 256]), ("model.optimizer.learning_rate", [0.001])])

    assert [label for label, _ in points] == [
        "training.batch_size=8, model.optimizer.learning_rate=0.001",
        "training.batch_size=256, model.optimizer.learning_rate=0.001",
    ]
    assert [(c.training.batch_size, c.model.optimizer.learning_rate) for _, c in points] == [(8, 0.001), (256, 0.001)]
    assert [label for label, _ in grid_points(raw, [])] == ["config as is"]


def test_a_negative_served_late_is_refused_before_any_training() -> None:
    with pytest.raises(ValueError, match="--served-late: expected a number of events >= 0, got -3"):
        run(argparse.Namespace(config=None, set=[], quick=True, served_late=-3))
