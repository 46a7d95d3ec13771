"""The replay's end: a summary table and a plot of rolling AUC over the replay."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from monolith.harness.replay.bookkeeping import rolling_auc

ROLLING_WINDOW = 2000  # events per rolling-AUC window
ROLLING_POINTS = 200  # about this many points per curve

# (key, label, format) of the summary table, in order.
SUMMARY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("events", "events replayed", "{:,}"),
    ("events_per_s", "events/s (target: --speed)", "{:,.1f}"),
    ("served_progressive_auc", "AUC, served online (progressive)", "{:.4f}"),
    ("frozen_auc", "AUC, frozen after the batch stage", "{:.4f}"),
    ("running_mean_baseline_auc", "AUC, running-mean baseline", "{:.4f}"),
    ("joiner_served_auc", "AUC, served, by the joiner's metrics", "{:.4f}"),
    ("served_calibration_ratio", "calibration: mean served / positive rate", "{:.3f}"),
    ("joiner_calibration_ratio", "calibration, by the joiner's metrics", "{:.3f}"),
    ("served_positive_rate", "positive rate", "{:.3f}"),
    ("joiner_positive_rate", "positive rate, by the joiner's metrics", "{:.3f}"),
    ("joiner_label_delay_mean_s", "joiner: mean label delay (event-time s)", "{:,.1f}"),
    ("served_differs_from_frozen", "events scored differently from frozen", "{:.1%}"),
    ("freshness_p50_s", "freshness p50 (s)", "{:.2f}"),
    ("freshness_p99_s", "freshness p99 (s)", "{:.2f}"),
    ("freshness_probes", "freshness probes", "{:,}"),
    ("freshness_misses", "freshness probes timed out", "{:,}"),
    ("impressions", "impressions (Predicts with a request_id)", "{:,}"),
    ("actions", "actions reported (positive)", "{:,}"),
    ("negative_actions", "actions reported (explicit negatives)", "{:,}"),
    ("samples_expected", "samples expected", "{:,}"),
    ("samples_joined", "samples joined", "{:,}"),
    ("samples_lost", "samples lost", "{:,}"),
    ("samples_duplicated", "samples duplicated", "{:,}"),
    ("samples_mislabeled", "samples with the other label", "{:,}"),
    ("joiner_late_actions", "joiner: actions after their window closed", "{:,}"),
    ("joiner_orphan_actions", "joiner: actions without an impression", "{:,}"),
    ("predict_errors", "Predict errors", "{:,}"),
    ("action_errors", "report_action errors", "{:,}"),
    ("batch_examples", "batch stage: examples", "{:,}"),
    ("batch_seconds", "batch stage: seconds", "{:.1f}"),
    ("replay_seconds", "replay: seconds", "{:.1f}"),
    ("consumer_lag", "trainer consumer lag at the end", "{:,}"),
)


def summary_table(result: Mapping[str, Any]) -> str:
    """The result as an aligned two-column table (keys it lacks are left out)."""
    rows = []
    for key, label, fmt in SUMMARY_ROWS:
        value = result.get(key)
        if value is None:
            continue
        text = "n/a" if isinstance(value, float) and math.isnan(value) else fmt.format(value)
        rows.append((label, text))
    width = max(len(label) for label, _ in rows) if rows else 0
    return "\n".join(f"  {label:<{width}}  {text}" for label, text in rows)


def plot_rolling_auc(path: str, labels: np.ndarray, curves: Mapping[str, np.ndarray],
                     window: int = ROLLING_WINDOW, title: str = "") -> str:  # fmt: skip
    """Plots the rolling AUC of each curve's scores over the replayed events; returns `path`.

    Args:
        path: the PNG to write (its directory is created).
        labels: per replayed event.
        curves: legend label -> scores per event (NaN where none).
        window: events per window (smaller when there are fewer events).
        title: the plot's title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    n = len(labels)
    window = max(1, min(window, n // 5 or n))
    step = max(1, n // ROLLING_POINTS)
    figure, axes = plt.subplots(figsize=(9, 4.8), dpi=110)
    try:
        for name, scores in curves.items():
            ends, values = rolling_auc(labels, scores, window, step)
            axes.plot(ends, values, label=name, linewidth=1.4)
        axes.set_xlabel("replayed events (time order)")
        axes.set_ylabel(f"AUC over the last {window:,} events")
        axes.set_title(title or "MovieLens-100k replay: rolling AUC")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right")
        figure.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path
