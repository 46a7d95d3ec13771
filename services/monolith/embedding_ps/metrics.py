"""Prometheus view of the embedding-PS tables, read from the shards at scrape time.

One collector serves every shard in the process (tests and benchmarks run several), so
the metric names are registered once; each series carries the role, the shard and the table.
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterator

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from monolith.embedding_ps.shard import EmbeddingShard

_LABELS = ("role", "shard", "table")


class _ShardCollector(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shards: weakref.WeakSet[EmbeddingShard] = weakref.WeakSet()

    def add(self, shard: EmbeddingShard) -> None:
        with self._lock:
            self._shards.add(shard)

    def remove(self, shard: EmbeddingShard) -> None:
        with self._lock:
            self._shards.discard(shard)

    def collect(self) -> Iterator[prometheus_client.Metric]:
        rows = GaugeMetricFamily("monolith_embedding_rows", "Live rows per table.", labels=_LABELS)
        size = GaugeMetricFamily("monolith_embedding_table_bytes", "Bytes held per table.", labels=_LABELS)
        pending = GaugeMetricFamily(
            "monolith_embedding_pending_ids", "Ids counted but not yet admitted.", labels=_LABELS
        )
        admissions = CounterMetricFamily(
            "monolith_embedding_admissions", "Ids admitted (rows created) since start.", labels=_LABELS
        )
        filtered = CounterMetricFamily(
            "monolith_embedding_filtered_gradients", "Gradients dropped: their id had no row.", labels=_LABELS
        )
        evictions = CounterMetricFamily(
            "monolith_embedding_evictions", "Rows evicted by expiry since start.", labels=_LABELS
        )
        version = GaugeMetricFamily("monolith_embedding_shard_version", "Shard version.", labels=("role", "shard"))
        with self._lock:
            shards = list(self._shards)
        for shard in shards:
            role, index = shard.config.role, str(shard.config.shard)
            version.add_metric([role, index], shard.version)
            for name, s in shard.stats().items():
                labels = [role, index, name]
                rows.add_metric(labels, s.rows)
                size.add_metric(labels, s.bytes)
                pending.add_metric(labels, s.pending_ids)
                admissions.add_metric(labels, s.admissions)
                filtered.add_metric(labels, s.filtered_gradients)
                evictions.add_metric(labels, s.evictions)
        yield from (rows, size, pending, admissions, filtered, evictions, version)

    def describe(self) -> Iterator[prometheus_client.Metric]:
        # Describing without collecting keeps registration free of shard reads.
        return iter(())


SHARDS = _ShardCollector()
prometheus_client.REGISTRY.register(SHARDS)


# Train→serve sync of a serving shard (embedding_ps/sync.py), labelled by shard.
_SYNC_LABELS = ("shard",)
SYNC_LAG = prometheus_client.Gauge(
    "monolith_sync_lag_seconds",
    "Event-time lag of the serving shard: the training shard's data clock (newest update time, at its latest "
    "Stats) minus its data clock as of the state the serving shard is complete up to (whole seconds of data "
    "time, not wall-clock time). NaN before the first complete sync.",
    _SYNC_LABELS,
)
SYNC_ROWS = prometheus_client.Counter(
    "monolith_sync_rows_total", "Rows upserted into the serving shard by sync.", _SYNC_LABELS
)
SYNC_DELETIONS = prometheus_client.Counter(
    "monolith_sync_deletions_total",
    "Rows deleted from the serving shard by sync (expired on training, or absent from a full copy).",
    _SYNC_LABELS,
)
SYNC_FULL_RESYNCS = prometheus_client.Counter(
    "monolith_sync_full_resyncs_total",
    "Full copies from the training shard (first sync, a restarted training shard, or too far behind).",
    _SYNC_LABELS,
)
SYNC_DELETIONS_REFUSED = prometheus_client.Counter(
    "monolith_sync_resync_deletions_refused_total",
    "Rows a full copy of a new training incarnation lacked, counted when they were more than "
    "--max-resync-delete-fraction of the serving shard's rows (an alarm: the training shard lost rows); they "
    "stay served.",
    _SYNC_LABELS,
)
SYNC_FAILURES = prometheus_client.Counter(
    "monolith_sync_failures_total", "Sync attempts that failed (retried at the next interval).", _SYNC_LABELS
)
SYNC_DURATION = prometheus_client.Histogram(
    "monolith_sync_duration_seconds",
    "Time of one sync attempt, successful or not.",
    _SYNC_LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
SYNC_VERSION = prometheus_client.Gauge(
    "monolith_sync_version", "Training shard version the serving shard is complete up to.", _SYNC_LABELS
)
SYNC_RETAINED = prometheus_client.Gauge(
    "monolith_sync_retained_rows",
    "Rows the serving shard keeps serving although its training shard lacks them (rolled back to a cut): each "
    "until training re-creates or deletes its id, or it expires.",
    _SYNC_LABELS,
)
