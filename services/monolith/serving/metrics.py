"""Prometheus metrics of model-serving (module globals: the registry is per process).

Predict's own RPC counts and latencies are the server factory's (common/metrics.py).
"""

from __future__ import annotations

import prometheus_client

IMPRESSIONS_PUBLISHED = prometheus_client.Counter(
    "monolith_serving_impressions_published_total",
    "Impressions stored on the EVENTS stream (acknowledged by JetStream).",
)
IMPRESSIONS_DROPPED = prometheus_client.Counter(
    "monolith_serving_impressions_dropped_total",
    "Impressions not published: queue_full (NATS slow or down), shutdown (still queued when the flush "
    "time ran out), too_large (over NATS's max payload), no_item (an empty item id).",
    ("reason",),
)
IMPRESSIONS_QUEUED = prometheus_client.Gauge(
    "monolith_serving_impressions_queued",
    "Impressions waiting to be published or in flight (bounded by --impression-queue).",
)
IMPRESSION_PUBLISH_FAILURES = prometheus_client.Counter(
    "monolith_serving_impression_publish_failures_total",
    "Impression publishes that failed and were retried (NATS down, slow, or the stream missing).",
)
for _reason in ("queue_full", "shutdown", "too_large", "no_item"):
    IMPRESSIONS_DROPPED.labels(_reason)  # exported at 0 before the first drop
