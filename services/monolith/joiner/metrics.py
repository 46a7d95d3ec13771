"""The sample-joiner's Prometheus metrics (module globals: one registry per process)."""

from __future__ import annotations

import prometheus_client

from monolith.joiner.quality import ServedQuality

EVENTS = prometheus_client.Counter(
    "monolith_joiner_events_total",
    "What the join saw, by partition and outcome: impressions (one per candidate), actions, duplicate_impressions, "
    "duplicate_actions, conflicting_actions, negative_actions, early_actions (before their impression), late_actions "
    "(after the window closed), orphan_actions (no impression within the window), late_impressions (after their "
    "action gave up waiting), positives, negatives, negatives_sampled_out.",
    ("partition", "outcome"),
)
SAMPLES = prometheus_client.Counter(
    "monolith_joiner_samples_published_total", "Samples published to SAMPLES.", ("partition", "label")
)
PUBLISH_FAILURES = prometheus_client.Counter(
    "monolith_joiner_publish_failures_total",
    "Sample publishes not acknowledged (the partition restarts and publishes what SAMPLES lacks).",
    ("partition",),
)
RESTARTS = prometheus_client.Counter(
    "monolith_joiner_partition_restarts_total",
    "Times a partition's join restarted from its last published sample.",
    ("partition",),
)
BAD_EVENTS = prometheus_client.Counter(
    "monolith_joiner_bad_events_total", "Events skipped because they could not be decoded or used.", ("partition",)
)
OPEN_WINDOWS = prometheus_client.Gauge(
    "monolith_joiner_open_windows", "Keys waiting: impressions for an action, actions for an impression.", ("partition",)
)
CONSUMER_LAG = prometheus_client.Gauge(
    "monolith_joiner_consumer_lag_events", "Events stored in the partition and not yet read by the joiner.",
    ("partition",),
)
ACTIONS_REPORTED = prometheus_client.Counter(
    "monolith_joiner_actions_reported_total", "Actions accepted by ReportActions and stored on EVENTS.", ("kind",)
)
SNAPSHOT_BYTES = prometheus_client.Counter(
    "monolith_joiner_snapshot_bytes_total",
    "Bytes of the join's state saved, by partition and kind: delta (what changed since the last save) or base "
    "(the whole state, when the deltas since the last base outgrow it).",
    ("partition", "kind"),
)
LABEL_DELAY = prometheus_client.Histogram(
    "monolith_joiner_label_delay_seconds",
    "Event-time seconds from an impression to the positive action that labelled it (0 when the action came "
    "first), per positive sample published.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600, 86400),
)


SERVED_AUC = prometheus_client.Gauge(
    "monolith_joiner_served_auc",
    "AUC of the served scores over the last samples published (monolith_joiner_quality_samples of them), "
    "negatives weighted by 1/sample rate.",
)
CALIBRATION_RATIO = prometheus_client.Gauge(
    "monolith_joiner_calibration_ratio",
    "Mean served probability over the observed positive rate, over the same samples (1: calibrated).",
)
POSITIVE_RATE = prometheus_client.Gauge(
    "monolith_joiner_positive_rate",
    "Positives over all impressions (negatives weighted by 1/sample rate), over the same samples.",
)
QUALITY_SAMPLES = prometheus_client.Gauge(
    "monolith_joiner_quality_samples",
    "Samples the quality gauges are computed over (the last published, up to the joiner's --quality-window).",
)


def export_quality(quality: ServedQuality) -> None:
    """The quality gauges read `quality`'s figures when scraped (one window per process)."""
    SERVED_AUC.set_function(lambda: quality.figures().auc)
    CALIBRATION_RATIO.set_function(lambda: quality.figures().calibration_ratio)
    POSITIVE_RATE.set_function(lambda: quality.figures().positive_rate)
    QUALITY_SAMPLES.set_function(lambda: float(quality.figures().samples))
