"""The served model's quality over the joiner's last samples (joiner.quality) and the weighted
AUC it rests on (model.quality.auc)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from monolith.joiner.quality import ServedQuality
from monolith.model.quality import auc


def pairwise_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    """AUC by its definition: the weighted share of (positive, negative) pairs ordered right, ties half."""
    won = total = 0.0
    for (lp, sp, wp), (ln, sn, wn) in itertools.product(zip(labels, scores, weights), repeat=2):
        if lp and not ln:
            won += wp * wn * (1.0 if sp > sn else 0.5 if sp == sn else 0.0)
            total += wp * wn
    return won / total


def test_weighted_auc_is_the_weighted_share_of_pairs_ordered_right_with_ties_half() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        labels = rng.random(n) < 0.4
        scores = np.round(rng.random(n), 1)  # many ties
        weights = rng.choice([1.0, 2.0, 4.0], n)
        if labels.all() or not labels.any():
            continue
        assert auc(labels, scores, weights) == pytest.approx(pairwise_auc(labels, scores, weights))
        assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores, np.ones(n)))


def test_weighting_an_example_k_times_is_repeating_it_k_times() -> None:
    rng = np.random.default_rng(3)
    labels, scores, weights = rng.random(300) < 0.3, rng.random(300), rng.integers(1, 5, 300)
    assert auc(labels, scores, weights) == pytest.approx(auc(np.repeat(labels, weights), np.repeat(scores, weights)))


def test_auc_of_one_class_is_nan_and_mismatched_lengths_are_refused() -> None:
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    assert math.isnan(auc(np.array([1, 0]), np.array([0.1, 0.2]), np.array([1.0, 0.0])))
    with pytest.raises(ValueError, match="3 labels, 2 scores"):
        auc(np.array([1, 0, 1]), np.array([0.1, 0.2]))


def test_figures_cover_the_last_window_samples_across_wrap_arounds() -> None:
    rng = np.random.default_rng(11)
    scores, labels = rng.random(1_050), (rng.random(1_050) < 0.3).astype(float)
    quality = ServedQuality(window=400, max_age=0.0)
    for start, stop in ((0, 150), (150, 500), (500, 501), (501, 1_050)):  # rounds of every size, one over the window
        quality.add(scores[start:stop], labels[start:stop], np.ones(stop - start))
        held = slice(max(0, stop - 400), stop)
        figures = quality.figures()
        assert figures.samples == stop - held.start
        assert figures.auc == pytest.approx(auc(labels[held], scores[held]))
        assert figures.positive_rate == pytest.approx(labels[held].mean())


def test_negatives_kept_at_a_rate_count_for_the_impressions_they_stand_for() -> None:
    quality = ServedQuality(window=100, max_age=0.0)
    # 10 positives scored 0.2; 20 negatives kept at rate 0.25 stand for 80: the positive rate is 10/90.
    quality.add([0.2] * 10 + [0.1] * 20, [1.0] * 10 + [0.0] * 20, [1.0] * 10 + [0.25] * 20)
    figures = quality.figures()
    assert figures.positive_rate == pytest.approx(10 / 90)
    mean_served = (10 * 0.2 + 80 * 0.1) / 90
    assert figures.calibration_ratio == pytest.approx(mean_served / (10 / 90))
    assert figures.auc == 1.0


def test_unscored_samples_are_left_out_and_an_empty_window_has_no_figures() -> None:
    quality = ServedQuality(window=10, max_age=0.0)
    empty = quality.figures()
    assert empty.samples == 0 and math.isnan(empty.auc) and math.isnan(empty.calibration_ratio)
    quality.add([math.nan, 0.9, 0.1], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0])
    assert quality.figures().samples == 2 and quality.figures().auc == 1.0
    quality.add([0.3], [1.0], [1.0])  # all positives so far, then none: calibration is undefined
    no_positives = ServedQuality(window=10, max_age=0.0)
    no_positives.add([0.1, 0.2], [0.0, 0.0], [1.0, 1.0])
    assert no_positives.figures().positive_rate == 0.0 and math.isnan(no_positives.figures().calibration_ratio)


def test_figures_are_computed_once_per_max_age_however_many_gauges_read_them() -> None:
    quality = ServedQuality(window=10, max_age=3600.0)
    quality.add([0.9, 0.1], [1.0, 0.0], [1.0, 1.0])
    first = quality.figures()
    quality.add([0.95], [0.0], [1.0])  # arrives within max_age: the next computation counts it
    assert quality.figures() is first and first.samples == 2
    fresh = ServedQuality(window=10, max_age=0.0)
    fresh.add([0.9, 0.1, 0.95], [1.0, 0.0, 0.0], [1.0] * 3)
    assert fresh.figures().auc == 0.5 and fresh.figures() is not fresh.figures()


def test_a_window_must_hold_a_sample() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        ServedQuality(window=0)
