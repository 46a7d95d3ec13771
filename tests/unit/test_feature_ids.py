"""feature_ids: stable across processes, distinct across features, ints and strings alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from monolith.data.feature_ids import FeatureIdCache, feature_id, feature_ids

VALUES = ["M", "F", "technician", "852", "", "Children's"]


def test_ids_are_the_same_in_another_process() -> None:
    here = {"gender": feature_ids("gender", VALUES).tolist(), "user_id": feature_ids("user_id", [1, 2, 943]).tolist()}
    script = (
        "import json; from monolith.data.feature_ids import feature_ids; "
        f"print(json.dumps({{'gender': feature_ids('gender', {VALUES!r}).tolist(), "
        "'user_id': feature_ids('user_id', [1, 2, 943]).tolist()}))"
    )
    # A different PYTHONHASHSEED makes sure nothing leans on Python's salted hash().
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout) == here


def test_same_value_in_two_features_gets_two_ids() -> None:
    values = np.arange(1000)
    assert not np.intersect1d(feature_ids("user_id", values), feature_ids("movie_id", values)).size


def test_ints_and_strings_hash_through_their_text() -> None:
    ints = feature_ids("movie_id", np.array([7, 8, 7], dtype=np.int64))
    assert ints.dtype == np.int64
    assert ints[0] == ints[2] != ints[1]
    np.testing.assert_array_equal(ints, feature_ids("movie_id", ["7", "8", "7"]))
    np.testing.assert_array_equal(ints, [feature_id("movie_id", v) for v in (7, 8, 7)])


def test_distinct_values_get_distinct_ids() -> None:
    values = np.arange(100_000)
    assert len(np.unique(feature_ids("movie_id", values))) == len(values)


def test_shape_is_kept_and_empty_input_is_fine() -> None:
    grid = np.array([["a", "b"], ["b", "c"]])
    ids = feature_ids("x", grid)
    assert ids.shape == (2, 2) and ids[0, 1] == ids[1, 0]
    empty = feature_ids("x", [])
    assert empty.shape == (0,) and empty.dtype == np.int64


def test_the_cache_gives_the_same_ids_as_feature_ids_and_stays_bounded() -> None:
    cache = FeatureIdCache(max_entries=4)
    for values in (
        np.array(["a", "b", "a"], dtype=object),
        np.array([7, 8, 7, 9, 10, 11, 12]),
        np.array([["x", "y"], ["x", ""]], dtype=object),
    ):
        np.testing.assert_array_equal(cache("f", values), feature_ids("f", values))
    assert cache._entries <= 4


def test_the_cache_is_bounded_by_bytes_and_does_not_keep_long_values() -> None:
    """Regression: capped by entries only, distinct 2 MiB values grew serving memory without bound."""
    cache = FeatureIdCache(max_bytes=64 * 1024, max_value_bytes=1024)
    long_values = np.array([f"{i}" + "z" * (2 << 20) for i in range(3)], dtype=object)
    np.testing.assert_array_equal(cache("zip", np.repeat(long_values, 2)), feature_ids("zip", np.repeat(long_values, 2)))
    assert cache.bytes == 0  # hashed, not remembered

    for start in range(0, 5000, 500):
        values = np.arange(start, start + 500)
        np.testing.assert_array_equal(cache("movie_id", values), feature_ids("movie_id", values))
        assert cache.bytes <= 64 * 1024
    assert cache.bytes > 0
