"""How good a model's scores are: AUC and log loss, in numpy."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve, with tied scores counted as half (Mann-Whitney U).

    `weights` (one per example, default 1) count an example as that many: a negative kept
    at sampling rate r weighs 1/r, and the AUC is that of the population it stands for.
    Returns NaN when only one class is present (or has weight).
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.ones(labels.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if not labels.shape[0] == scores.shape[0] == w.shape[0]:
        raise ValueError(f"auc: {labels.shape[0]} labels, {scores.shape[0]} scores, {w.shape[0]} weights")
    # Per distinct score, the weight of its positives and negatives, in score order.
    distinct, group = np.unique(scores, return_inverse=True)
    positive = np.bincount(group, weights=np.where(labels, w, 0.0), minlength=distinct.shape[0])
    negative = np.bincount(group, weights=np.where(labels, 0.0, w), minlength=distinct.shape[0])
    total_positive, total_negative = positive.sum(), negative.sum()
    if total_positive <= 0 or total_negative <= 0:
        return float("nan")
    # Each positive beats the negatives scored below it and ties half of those scored the same.
    below = np.cumsum(negative) - negative
    return float(np.dot(positive, below + negative / 2.0) / (total_positive * total_negative))


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
