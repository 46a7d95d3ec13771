"""Raw feature values to int64 ids through a stable, per-feature 64-bit hash.

The ids key embedding rows that live in other processes (parameter servers, the
serving replica, a later run restoring a checkpoint), so they must not depend on the
process: Python's `hash()` is salted per process, blake2b is not. The feature name is
part of the hashed text so that the same raw value in two features (user 7 and movie 7)
gets two different ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

# A byte that does not occur in feature names or ordinary values, so "a" + "bc" and
# "ab" + "c" hash differently.
_SEPARATOR = "\x1f"


def feature_id(feature: str, value: object) -> int:
    """The int64 id of one raw value of `feature`.

    Args:
        feature: feature name.
        value: raw value; hashed through its `str()` (so 7 and "7" share an id).

    Returns:
        A signed 64-bit id, the first 8 bytes of blake2b read little-endian.
    """
    return int.from_bytes(_digest(feature, value), "little", signed=True)


def feature_ids(feature: str, values: np.ndarray | Sequence) -> np.ndarray:
    """Maps raw values (ints or strings) of `feature` to int64 ids, elementwise.

    Only the distinct values are hashed, so a column of 100k rows with a few thousand
    distinct values costs a few thousand hashes plus an `np.unique`.

    Args:
        feature: feature name; part of the hash, so features do not share ids.
        values: raw values of one type (all ints or all strings), any shape. Each is
            hashed through its `str()`, so 7, np.int64(7) and "7" share an id.

    Returns:
        int64 array of the same shape as `values`; equal to
        `feature_id(feature, v)` for each element v.
    """
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(array.shape, np.int64)
    unique, inverse = np.unique(array.ravel(), return_inverse=True)
    # tolist() hands over Python scalars in one call, cheaper than boxing numpy scalars one by one.
    digests = b"".join(_digest(feature, value) for value in unique.tolist())
    unique_ids = np.frombuffer(digests, dtype="<i8").astype(np.int64)
    return unique_ids[inverse.ravel()].reshape(array.shape)


def _digest(feature: str, value: object) -> bytes:
    """8 bytes of blake2b over the feature name and the value's text."""
    return hashlib.blake2b(f"{feature}{_SEPARATOR}{value}".encode(), digest_size=8).digest()


class FeatureIdCache:
    """`feature_ids` with a memo of the values seen, for request-sized batches.

    Serving hashes the same few thousand users and items over and over; a dict lookup
    costs a tenth of a blake2b plus `np.unique` on a 100-value request. The memo is
    bounded: past `max_entries` values it starts over.
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self._memo: dict[str, dict[object, int]] = {}
        self._entries = 0
        self._max_entries = max_entries

    def __call__(self, feature: str, values: np.ndarray | Sequence) -> np.ndarray:
        """Same result as `feature_ids(feature, values)`."""
        array = np.asarray(values)
        flat = array.ravel().tolist()
        memo = self._memo.setdefault(feature, {})
        out = np.empty(len(flat), dtype=np.int64)
        for i, value in enumerate(flat):
            cached = memo.get(value)
            if cached is None:
                if self._entries >= self._max_entries:
                    self._memo.clear()
                    self._entries = 0
                    memo = self._memo.setdefault(feature, {})
                cached = memo[value] = feature_id(feature, value)
                self._entries += 1
            out[i] = cached
        return out.reshape(array.shape)
