"""A batch of examples stored in columns, with every feature ragged (one row_splits per feature)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np


def _as_1d(name: str, value: object, dtype: type[np.generic], kinds: str) -> np.ndarray:
    """`value` as a 1-D array of `dtype`, refusing arrays whose kind would not cast faithfully."""
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    # An empty list comes in as float64; let it through, it holds nothing to mangle.
    if array.size and array.dtype.kind not in kinds:
        raise ValueError(f"{name} must have dtype kind in {kinds!r}, got {array.dtype}")
    return array.astype(dtype, copy=False)


# eq=False: the generated __eq__ would compare numpy arrays with `==` and fail on truthiness.
@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """Examples in columns.

    Every feature is ragged: `ids[feature]` holds the flat int64 ids of all examples and
    `row_splits[feature]` (int64, n + 1 entries) says where each example's ids start and
    end, so example i's ids are `ids[f][row_splits[f][i]:row_splits[f][i + 1]]`. A
    single-valued feature has `row_splits == arange(n + 1)`.

    Construction copies the two dicts (not the arrays) and casts arrays to the canonical
    dtypes; slices share memory with the batch they came from.

    Attributes:
        ids: feature name -> flat int64 ids of all examples.
        row_splits: feature name -> int64 offsets into `ids[feature]`, n + 1 entries.
        labels: float32 [n], 1.0 for a positive example.
        timestamps: int64 [n], seconds since the epoch.

    Raises:
        ValueError: if the columns disagree on the number of examples, the two dicts have
            different features, or some row_splits is not non-decreasing from 0 to
            `len(ids[feature])`.
    """

    ids: dict[str, np.ndarray]
    row_splits: dict[str, np.ndarray]
    labels: np.ndarray
    timestamps: np.ndarray

    def __post_init__(self) -> None:
        labels = _as_1d("labels", self.labels, np.float32, "biuf")
        timestamps = _as_1d("timestamps", self.timestamps, np.int64, "iu")
        n = len(labels)
        if len(timestamps) != n:
            raise ValueError(f"labels has {n} examples but timestamps has {len(timestamps)}")
        if set(self.ids) != set(self.row_splits):
            raise ValueError(
                f"ids and row_splits name different features: {sorted(self.ids)} vs {sorted(self.row_splits)}"
            )
        ids: dict[str, np.ndarray] = {}
        row_splits: dict[str, np.ndarray] = {}
        for feature in self.ids:
            flat = _as_1d(f"ids[{feature!r}]", self.ids[feature], np.int64, "iu")
            splits = _as_1d(f"row_splits[{feature!r}]", self.row_splits[feature], np.int64, "iu")
            if len(splits) != n + 1:
                raise ValueError(f"row_splits[{feature!r}] has {len(splits)} entries, expected n + 1 = {n + 1}")
            if splits[0] != 0:
                raise ValueError(f"row_splits[{feature!r}] must start at 0, starts at {splits[0]}")
            if splits[-1] != len(flat):
                raise ValueError(
                    f"row_splits[{feature!r}] ends at {splits[-1]} but ids[{feature!r}] has {len(flat)} ids"
                )
            if n and np.any(np.diff(splits) < 0):
                raise ValueError(f"row_splits[{feature!r}] must be non-decreasing")
            ids[feature] = flat
            row_splits[feature] = splits
        # Frozen: the validated, canonical values replace what the caller passed.
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "row_splits", row_splits)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "timestamps", timestamps)

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.labels)

    @property
    def features(self) -> tuple[str, ...]:
        """Feature names, in insertion order."""
        return tuple(self.ids)

    def slice(self, start: int, stop: int) -> Batch:
        """Examples [start, stop), with row_splits rebased to 0.

        Indices follow Python slicing: negative values count from the end and
        out-of-range values are clipped. Flat ids, labels and timestamps are views.
        """
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        ids: dict[str, np.ndarray] = {}
        row_splits: dict[str, np.ndarray] = {}
        for feature, splits in self.row_splits.items():
            lo, hi = splits[start], splits[stop]
            ids[feature] = self.ids[feature][lo:hi]
            row_splits[feature] = splits[start : stop + 1] - lo
        return Batch(ids, row_splits, self.labels[start:stop], self.timestamps[start:stop])

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive slices of `batch_size` examples; the last one may be shorter.

        Raises:
            ValueError: if batch_size < 1.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.slice(start, start + batch_size)

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """The examples of `batches`, one after another.

        Raises:
            ValueError: if `batches` is empty (there would be no feature names) or the
                batches do not all have the same features.
        """
        if not batches:
            raise ValueError("concat needs at least one batch")
        features = batches[0].features
        for other in batches[1:]:
            if set(other.features) != set(features):
                raise ValueError(f"cannot concat batches with features {features} and {other.features}")
        ids = {f: np.concatenate([b.ids[f] for b in batches]) for f in features}
        row_splits = {f: _concat_splits([b.row_splits[f] for b in batches]) for f in features}
        labels = np.concatenate([b.labels for b in batches])
        timestamps = np.concatenate([b.timestamps for b in batches])
        return Batch(ids, row_splits, labels, timestamps)


def _concat_splits(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Joins row_splits, shifting each part by the number of ids before it."""
    # Each part drops its leading 0 so the joined offsets have exactly n + 1 entries.
    offsets = np.cumsum([0] + [int(p[-1]) for p in parts[:-1]])
    return np.concatenate([np.zeros(1, np.int64)] + [p[1:] + o for p, o in zip(parts, offsets)])


def single_valued(ids: Mapping[str, np.ndarray], labels: np.ndarray, timestamps: np.ndarray) -> Batch:
    """A batch whose features each hold exactly one id per example.

    Args:
        ids: feature name -> int64 ids, one per example.
        labels: float32 [n].
        timestamps: int64 [n].
    """
    n = len(labels)
    return Batch(dict(ids), {f: np.arange(n + 1, dtype=np.int64) for f in ids}, labels, timestamps)
