"""How good the served model is, from the samples the joiner publishes.

Every sample carries the probability model-serving served for its impression and the label
the join decided, so the joiner sees the production model's quality first: `ServedQuality`
keeps the last `window` published samples (score, label, sampling rate) and computes, over
the population they stand for (a negative kept at rate r counts 1/r times):

- the served AUC;
- the positive rate (positives over all impressions);
- the calibration ratio: the mean served probability over the positive rate (1 when
  calibrated; model-serving already corrects its odds for the negative sampling rate).

Figures are computed when read (a scrape), at most once per `max_age` seconds (the gauges of
one scrape share one computation, over the same samples), from a ring buffer the publishing
loop only writes into: one vectorized copy per published round. The window lives in memory: a
restarted joiner starts it empty.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from monolith.model.quality import auc


class QualityFigures(NamedTuple):
    """The served model's quality over the samples in the window (NaN: not enough of them)."""

    samples: int
    auc: float
    positive_rate: float
    calibration_ratio: float


class ServedQuality:
    """The served model's quality over the last `window` samples published.

    Args:
        window: samples kept (the newest replace the oldest).
        max_age: seconds a computed `figures()` is reused for (scrapes from several
            gauges, or several scrapers, compute it once).
    """

    def __init__(self, window: int, max_age: float = 1.0) -> None:
        if window < 1:
            raise ValueError(f"the quality window must hold at least one sample, got {window}")
        self.window = window
        self._max_age = max_age
        self._scores = np.zeros(window, dtype=np.float64)
        self._labels = np.zeros(window, dtype=bool)
        self._weights = np.zeros(window, dtype=np.float64)
        self._next = 0  # where the next sample goes
        self._count = 0  # samples held (up to window)
        self._lock = threading.Lock()
        self._cached: tuple[float, QualityFigures] | None = None

    def add(self, scores: Sequence[float], labels: Sequence[float], rates: Sequence[float]) -> None:
        """Records published samples: their served scores, labels (1 positive) and sampling rates.

        A NaN score is left out (a caller's way to say it is unknown; impressions always carry
        the score served).
        """
        score = np.asarray(scores, dtype=np.float64)
        keep = ~np.isnan(score)
        score = score[keep][-self.window :]
        label = (np.asarray(labels, dtype=np.float64)[keep] >= 0.5)[-self.window :]
        weight = 1.0 / np.asarray(rates, dtype=np.float64)[keep][-self.window :]
        n = score.shape[0]
        with self._lock:
            first = min(n, self.window - self._next)  # up to the end of the ring, the rest from its start
            for target, values in ((self._scores, score), (self._labels, label), (self._weights, weight)):
                target[self._next : self._next + first] = values[:first]
                target[: n - first] = values[first:]
            self._next = (self._next + n) % self.window
            self._count = min(self._count + n, self.window)

    def figures(self) -> QualityFigures:
        """AUC, positive rate and calibration ratio over the samples held."""
        now = time.monotonic()
        with self._lock:
            if self._cached is not None and now - self._cached[0] < self._max_age:
                return self._cached[1]
            count = self._count
            scores, labels, weights = self._scores[:count].copy(), self._labels[:count].copy(), self._weights[:count].copy()
        figures = _figures(scores, labels, weights)
        with self._lock:
            self._cached = (now, figures)
        return figures


def _figures(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> QualityFigures:
    total = float(weights.sum())
    if total <= 0:
        return QualityFigures(0, math.nan, math.nan, math.nan)
    positive_rate = float(weights[labels].sum()) / total
    mean_score = float(np.dot(scores, weights)) / total
    calibration = mean_score / positive_rate if positive_rate > 0 else math.nan
    return QualityFigures(int(scores.shape[0]), auc(labels, scores, weights), positive_rate, calibration)
