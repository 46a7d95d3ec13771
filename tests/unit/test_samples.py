"""SampleDecoder: samples of the SAMPLES stream to batches, ids as serving hashes them, bad samples left out."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from monolith.api.joiner.v1 import joiner_pb2
from monolith.data.feature_ids import feature_id
from monolith.data.movielens import load_movielens, raw_feature_values
from monolith.data.samples import SampleDecoder, SampleFeature
from monolith.model.config import default_config_path, load_model_config
from monolith.serving.model import ServingModel

FEATURES = (SampleFeature("user_id"), SampleFeature("movie_id"), SampleFeature("genres", multi_valued=True))
NOW = 1_700_000_000.0


def sample(features: Mapping[str, Sequence[object]], label: float = 1.0, event_time: float = 880_000_000.5,
           sample_rate: float = 1.0) -> bytes:  # fmt: skip
    """A serialized Sample with values as text, as the joiner writes them."""
    message = joiner_pb2.Sample(request_id="r", item_id="i", label=label, event_time=event_time,
                                sample_rate=sample_rate)  # fmt: skip
    for name, values in features.items():
        message.features[name].values.extend(str(v) for v in values)
    return message.SerializeToString()


def decoder() -> SampleDecoder:
    return SampleDecoder(FEATURES, clock=lambda: NOW)


def test_movielens_samples_decode_to_the_ids_of_the_training_data_and_of_serving() -> None:
    config = load_model_config(default_config_path())
    data = load_movielens(limit=300)
    raw = raw_feature_values()
    users = {feature_id("user_id", u["user_id"]): u for u in raw["users"]}
    movies = {feature_id("movie_id", m["movie_id"]): m for m in raw["movies"]}
    payloads, inputs = [], {f.source: [] for f in config.features}
    for i in range(len(data)):
        user = users[int(data.ids["user_id"][i])]
        movie = movies[int(data.ids["movie_id"][i])]
        values = {**{k: [v] for k, v in user.items()}, "movie_id": [movie["movie_id"]], "genres": movie["genres"]}
        payloads.append(sample(values, float(data.labels[i]), float(data.timestamps[i])))
        for name, row in values.items():
            inputs[name].append(row)

    decoded = SampleDecoder([SampleFeature(f.source, f.multi_valued) for f in config.features]).decode(payloads)

    assert decoded.kept == list(range(len(data))) and not decoded.rejected
    batch = decoded.batch
    np.testing.assert_array_equal(batch.labels, data.labels)
    np.testing.assert_array_equal(batch.timestamps, data.timestamps)
    # Serving parses the same values as Predict inputs (ints as int64, strings, genres padded with "").
    width = max(len(row) for row in inputs["genres"])
    request = {name: np.array([row[0] for row in rows], dtype=np.int64 if name.endswith("_id") else object)
               for name, rows in inputs.items() if name != "genres"}  # fmt: skip
    request["genres"] = np.array([row + [""] * (width - len(row)) for row in inputs["genres"]], dtype=object)
    served_ids, served_splits, _ = ServingModel(config, None, None).parse(request)  # type: ignore[arg-type]
    for feature in config.features:
        np.testing.assert_array_equal(batch.ids[feature.source], data.ids[feature.source], err_msg=feature.source)
        np.testing.assert_array_equal(batch.row_splits[feature.source], data.row_splits[feature.source])
        np.testing.assert_array_equal(batch.ids[feature.source], served_ids[feature.source], err_msg=feature.source)
        np.testing.assert_array_equal(batch.row_splits[feature.source], served_splits[feature.source])


def test_bad_samples_are_left_out_with_a_reason_and_the_rest_make_the_batch() -> None:
    good = {"user_id": [7], "movie_id": [42], "genres": ["Comedy", "Drama"]}
    payloads = [
        sample(good),
        b"\xff\xff\xff not a protobuf",
        sample({**good, "shoe_size": [44]}),
        sample({"user_id": [7], "genres": ["Comedy"]}),
        sample({**good, "movie_id": [1, 2]}),
        sample(good, label=2.0),
        sample(good, label=math.nan),
        sample(good, event_time=math.nan),
        sample(good, event_time=-5.0),
        sample(good, event_time=NOW + 2 * 86_400),
        sample(good, sample_rate=1.5),
        sample({**good, "user_id": [8]}, label=0.0, event_time=880_000_100.9),
    ]

    decoded = decoder().decode(payloads)

    assert decoded.kept == [0, 11]
    reasons = {r.position: (r.kind, r.reason) for r in decoded.rejected}
    assert sorted(reasons) == list(range(1, 11))
    assert reasons[1][0] == "malformed" and "not a Sample" in reasons[1][1]
    assert all(kind == "invalid" for position, (kind, _) in reasons.items() if position != 1)
    assert "unknown feature(s) 'shoe_size'" in reasons[2][1]
    assert "'movie_id' is missing" in reasons[3][1]
    assert "single-valued but has 2 values" in reasons[4][1]
    assert "label" in reasons[5][1] and "label" in reasons[6][1]
    assert "event_time" in reasons[7][1] and "event_time" in reasons[8][1]
    assert "ahead of this machine's clock" in reasons[9][1]
    assert "sample_rate" in reasons[10][1]
    batch = decoded.batch
    assert batch.ids["user_id"].tolist() == [feature_id("user_id", 7), feature_id("user_id", 8)]
    assert batch.labels.tolist() == [1.0, 0.0]
    assert batch.timestamps.tolist() == [880_000_000, 880_000_100]  # whole seconds of event time


def test_multi_valued_pads_are_dropped_and_empty_rows_kept() -> None:
    payloads = [
        sample({"user_id": [1], "movie_id": [2], "genres": ["Comedy", "", ""]}),
        sample({"user_id": [1], "movie_id": [3], "genres": []}),
        sample({"user_id": [1], "movie_id": [4], "genres": ["", "War"]}),
    ]

    batch = decoder().decode(payloads).batch

    assert batch.row_splits["genres"].tolist() == [0, 1, 1, 2]
    assert batch.ids["genres"].tolist() == [feature_id("genres", "Comedy"), feature_id("genres", "War")]


def test_no_event_time_stays_zero_and_nothing_usable_makes_an_empty_batch() -> None:
    untimed = decoder().decode([sample({"user_id": [1], "movie_id": [2], "genres": ["War"]}, event_time=0.0)])
    assert untimed.batch.timestamps.tolist() == [0]  # "no time given": it never moves a table's clock

    empty = decoder().decode([b"\x08", b""])
    assert len(empty.batch) == 0 and empty.kept == []
    assert set(empty.batch.ids) == {"user_id", "movie_id", "genres"}


def test_a_source_declared_single_and_multi_valued_is_refused() -> None:
    SampleDecoder([SampleFeature("user_id"), SampleFeature("user_id")])  # two features reading one source
    with pytest.raises(ValueError, match="both single- and multi-valued"):
        SampleDecoder([SampleFeature("genres"), SampleFeature("genres", multi_valued=True)])
