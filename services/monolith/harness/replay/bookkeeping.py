"""The replay's figures: served scores per event, AUCs, percentiles, sample reconciliation.

Progressive validation as served: each replayed event is scored by Predict before its
action goes out (so before the stack can train on it); the AUC of those scores against
the labels is the served progressive AUC. Everything here is plain computation, tested
without a stack.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter
from typing import Iterable

import numpy as np

from monolith.joiner.config import keeps_negative
from monolith.model.quality import auc

SampleKey = tuple[str, str]  # (request_id, item_id)


class ScoreBook:
    """Served scores by replayed event index, filled by several worker threads.

    Args:
        labels: the replayed events' labels, in order.
    """

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels, dtype=np.float32)
        self.scores = np.full(self.labels.shape[0], np.nan, dtype=np.float64)
        self._lock = threading.Lock()
        self.recorded = 0
        self.failed = 0

    def record(self, i: int, score: float) -> None:
        with self._lock:
            self.scores[i] = score
            self.recorded += 1

    def fail(self, i: int) -> None:
        """Event i got no score (its Predict failed); it is left out of the AUCs."""
        with self._lock:
            self.failed += 1

    def auc(self) -> float:
        """AUC of the scores recorded so far (NaN until both classes are present)."""
        with self._lock:
            scores = self.scores.copy()
        return auc_of_scored(self.labels, scores)


def auc_of_scored(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC over the events that have a score (NaN marks none)."""
    scored = ~np.isnan(scores)
    return auc(np.asarray(labels)[scored], scores[scored]) if scored.any() else math.nan


def rolling_auc(labels: np.ndarray, scores: np.ndarray, window: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """AUC over a sliding window of events, ending every `step` events.

    Events without a score (NaN) are left out of their window.

    Args:
        labels: per event, in replay order.
        scores: per event, NaN where none.
        window: events per window (clipped to the number of events).
        step: events between two windows' ends.

    Returns:
        (end index of each window, exclusive; its AUC, NaN when a window holds one class).
    """
    if window < 1 or step < 1:
        raise ValueError(f"window and step must be >= 1, got {window} and {step}")
    n = len(labels)
    window = min(window, n)
    ends = np.arange(window, n + 1, step) if n else np.zeros(0, np.int64)
    if n and (ends.shape[0] == 0 or ends[-1] != n):
        ends = np.append(ends, n)
    values = np.array([auc_of_scored(labels[e - window : e], scores[e - window : e]) for e in ends])
    return ends, values


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation); NaN for no values."""
    array = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(array, q)) if array.size else math.nan


@dataclasses.dataclass(frozen=True)
class SampleCounts:
    """The SAMPLES stream compared with what the replay expects.

    Attributes:
        expected: distinct (request_id, item_id) keys expected, one sample each.
        joined: expected keys with at least one sample.
        lost: expected keys with none.
        duplicated: sample messages beyond the first of their key.
        unexpected: samples of this run whose key was not expected.
        mislabeled: expected keys whose first sample has the wrong label.
    """

    expected: int
    joined: int
    lost: int
    duplicated: int
    unexpected: int
    mislabeled: int


def reconcile(expected: dict[SampleKey, float], samples: Iterable[tuple[SampleKey, float]]) -> SampleCounts:
    """Counts the samples of this run against the expected ones.

    Args:
        expected: the label each expected key should carry (1.0 positive, 0.0 negative).
        samples: (key, label) of every sample message of this run, in stream order.
    """
    seen: Counter[SampleKey] = Counter()
    first_label: dict[SampleKey, float] = {}
    for key, label in samples:
        seen[key] += 1
        first_label.setdefault(key, label)
    joined = sum(1 for key in expected if key in seen)
    return SampleCounts(
        expected=len(expected),
        joined=joined,
        lost=len(expected) - joined,
        duplicated=sum(count - 1 for count in seen.values()),
        unexpected=sum(1 for key in seen if key not in expected),
        mislabeled=sum(1 for key, label in first_label.items() if key in expected and (label >= 0.5)
                       != (expected[key] >= 0.5)),  # fmt: skip
    )


def expected_samples(impressions: Iterable[tuple[str, str, float]], negative_sample_rate: float) -> dict[SampleKey, float]:
    """The samples the joiner should produce for these impressions: one per key.

    A positive always; a negative only if the joiner's negative sampling keeps it, which is
    a stable hash of the key (`keeps_negative`), so the expected set is exact at any rate.

    Args:
        impressions: (request_id, item_id, label) of every impression sent.
        negative_sample_rate: the joiner's rate of negatives kept.
    """
    return {
        (request_id, item_id): label
        for request_id, item_id, label in impressions
        if label >= 0.5 or keeps_negative(request_id, item_id, negative_sample_rate)
    }


def mislabeled(expected: dict[SampleKey, float], samples: Iterable[tuple[SampleKey, float]]) -> list[str]:
    """"request_id item_id: expected X, got Y" for each expected key whose first sample has the other label."""
    first: dict[SampleKey, float] = {}
    for key, label in samples:
        first.setdefault(key, label)
    return [
        f"{key[0]} {key[1]}: expected {expected[key]:g}, got {label:g}"
        for key, label in first.items()
        if key in expected and (label >= 0.5) != (expected[key] >= 0.5)
    ]
