"""Batch: construction checks, slice, batches and concat."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from monolith.data.batch import Batch, single_valued


def make_batch(lengths: list[int], start_id: int = 0) -> Batch:
    """A batch with one single-valued feature "a" and one ragged feature "b" of the given lengths."""
    n = len(lengths)
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Batch(
        ids={"a": np.arange(start_id, start_id + n), "b": np.arange(splits[-1]) + 1000 * (start_id + 1)},
        row_splits={"a": np.arange(n + 1), "b": splits},
        labels=np.arange(n) % 2,
        timestamps=np.arange(start_id, start_id + n) * 10,
    )


def rows(batch: Batch, feature: str) -> list[list[int]]:
    """Each example's ids of `feature`, as Python lists."""
    splits = batch.row_splits[feature]
    return [batch.ids[feature][splits[i] : splits[i + 1]].tolist() for i in range(len(batch))]


def test_construction_casts_to_canonical_dtypes() -> None:
    batch = make_batch([1, 0, 2])
    assert len(batch) == 3
    assert batch.features == ("a", "b")
    assert batch.labels.dtype == np.float32
    assert batch.timestamps.dtype == np.int64
    assert all(a.dtype == np.int64 for a in [*batch.ids.values(), *batch.row_splits.values()])
    assert rows(batch, "b") == [[1000], [], [1001, 1002]]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": np.zeros(2)}, "timestamps"),
        ({"row_splits": {"a": np.arange(4), "b": np.array([0, 1, 1])}}, "n \\+ 1"),
        ({"row_splits": {"a": np.arange(4), "b": np.array([1, 1, 1, 3])}}, "start at 0"),
        ({"row_splits": {"a": np.arange(4), "b": np.array([0, 1, 1, 2])}}, "ends at 2"),
        ({"row_splits": {"a": np.arange(4), "b": np.array([0, 2, 1, 3])}}, "non-decreasing"),
        ({"row_splits": {"a": np.arange(4)}}, "different features"),
        ({"ids": {"a": np.zeros(3), "b": np.zeros(3)}}, "dtype kind"),
        ({"labels": np.zeros((3, 1))}, "1-D"),
    ],
)
def test_construction_rejects_inconsistent_columns(change: dict, message: str) -> None:
    good = make_batch([1, 0, 2])
    fields = {"ids": good.ids, "row_splits": good.row_splits, "labels": good.labels, "timestamps": good.timestamps}
    with pytest.raises(ValueError, match=message):
        Batch(**{**fields, **change})


def test_slice_rebases_row_splits() -> None:
    batch = make_batch([2, 0, 3, 1])
    part = batch.slice(1, 3)
    assert len(part) == 2
    assert part.row_splits["b"].tolist() == [0, 0, 3]
    assert rows(part, "b") == rows(batch, "b")[1:3]
    assert rows(part, "a") == [[1], [2]]
    assert part.timestamps.tolist() == [10, 20]
    assert len(batch.slice(3, 1)) == 0
    assert rows(batch.slice(-1, 100), "b") == rows(batch, "b")[-1:]


def test_batches_cover_everything_in_order() -> None:
    batch = make_batch([1, 2, 0, 3, 1, 1, 2])
    parts = list(batch.batches(3))
    assert [len(p) for p in parts] == [3, 3, 1]
    assert sum((rows(p, "b") for p in parts), []) == rows(batch, "b")
    with pytest.raises(ValueError, match="batch_size"):
        next(batch.batches(0))


def test_concat_is_the_inverse_of_batches() -> None:
    batch = make_batch([1, 2, 0, 3, 1, 1, 2])
    joined = Batch.concat(list(batch.batches(2)))
    for feature in batch.features:
        np.testing.assert_array_equal(joined.ids[feature], batch.ids[feature])
        np.testing.assert_array_equal(joined.row_splits[feature], batch.row_splits[feature])
    np.testing.assert_array_equal(joined.labels, batch.labels)
    np.testing.assert_array_equal(joined.timestamps, batch.timestamps)


def test_concat_rejects_empty_input_and_mismatched_features() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Batch.concat([])
    other = single_valued({"a": np.arange(2)}, np.zeros(2), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="features"):
        Batch.concat([make_batch([1, 1]), other])


def test_single_valued_has_one_id_per_example() -> None:
    batch = single_valued({"u": np.array([5, 6, 7])}, np.ones(3), np.arange(3))
    assert rows(batch, "u") == [[5], [6], [7]]


@given(
    lengths=st.lists(st.integers(0, 4), max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=4),
)
def test_slices_at_any_cuts_concat_back_to_the_batch(lengths: list[int], cuts: list[int]) -> None:
    batch = make_batch(lengths)
    bounds = [0, *sorted(min(c, len(batch)) for c in cuts), len(batch)]
    joined = Batch.concat([batch.slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])])
    assert rows(joined, "b") == rows(batch, "b")
    assert rows(joined, "a") == rows(batch, "a")
