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
