"""The sample-joiner's Prometheus metrics (module globals: one registry per process)."""

from __future__ import annotations

import prometheus_client

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
