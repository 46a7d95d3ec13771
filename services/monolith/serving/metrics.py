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
BATCH_EXAMPLES = prometheus_client.Histogram(
    "monolith_serving_batch_examples",
    "Examples (candidates) scored together in one batch of Predict calls.",
    buckets=(1, 10, 50, 100, 200, 400, 800, 1600, 3200, 6400),
)
BATCH_CALLS = prometheus_client.Histogram(
    "monolith_serving_batch_calls",
    "Predict calls scored together in one batch.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
BATCH_QUEUE_SECONDS = prometheus_client.Histogram(
    "monolith_serving_batch_queue_seconds",
    "Seconds a Predict call waited in the batching queue before its batch started.",
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
BATCH_ABANDONED = prometheus_client.Counter(
    "monolith_serving_batch_abandoned_total",
    "Predict calls that left the batching queue unscored: deadline (passed while queued or while its "
    "batch ran) or cancelled (by the client).",
    ("reason",),
)
for _reason in ("deadline", "cancelled"):
    BATCH_ABANDONED.labels(_reason)
for _reason in ("queue_full", "shutdown", "too_large", "no_item"):
    IMPRESSIONS_DROPPED.labels(_reason)  # exported at 0 before the first drop

# The embedding cache (serving/embedding_cache.py).
CACHE_HITS = prometheus_client.Counter(
    "monolith_serving_cache_hits_total",
    "Ids of serving lookups answered from the embedding cache.",
)
CACHE_MISSES = prometheus_client.Counter(
    "monolith_serving_cache_misses_total",
    "Ids of serving lookups sent to the serving shards: not cached, or cached from a shard whose last successful "
    "refresh began longer ago than the staleness bound.",
)
CACHE_REFUSED = prometheus_client.Counter(
    "monolith_serving_cache_refused_total",
    "Rows looked up on a miss and answered but not cached, because their shard's changes were applied (or its rows "
    "dropped) while the lookup was in flight.",
)
CACHE_BYTES = prometheus_client.Gauge(
    "monolith_serving_cache_bytes",
    "Bytes the embedding cache's arrays take (rows and their index; at most --embedding-cache-bytes).",
)
CACHE_ROWS = prometheus_client.Gauge("monolith_serving_cache_rows", "Rows in the embedding cache.")
CACHE_EVICTIONS = prometheus_client.Counter(
    "monolith_serving_cache_evictions_total",
    "Rows evicted from the embedding cache to make room for others.",
)
CACHE_STALENESS = prometheus_client.Gauge(
    "monolith_serving_cache_staleness_seconds",
    "Seconds since the last successful refresh of a serving shard's cached rows began: how far behind that shard "
    "they may be. Past twice --embedding-cache-refresh they are not answered.",
    ("shard",),
)
CACHE_INVALIDATIONS = prometheus_client.Counter(
    "monolith_serving_cache_invalidations_total",
    "Times every row cached from one serving shard was dropped: restarted (a new incarnation), forgotten (its "
    "deletion log no longer reached back to the cache's position), failed (following it afresh failed midway).",
    ("reason",),
)
CACHE_REFRESH_FAILURES = prometheus_client.Counter(
    "monolith_serving_cache_refresh_failures_total",
    "Refreshes of a serving shard's cached rows that failed (Stats or Export).",
    ("shard",),
)
for _reason in ("restarted", "forgotten", "failed"):
    CACHE_INVALIDATIONS.labels(_reason)
