"""Prometheus view of the dense-PS, read from the stores at scrape time.

One collector serves every store in the process (tests run several), so the metric names
are registered once. A deployment runs one store per process, so the series carry no
labels of their own; Prometheus adds the pod's.
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterator

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from monolith.dense_ps.store import DenseStore


class _StoreCollector(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: weakref.WeakSet[DenseStore] = weakref.WeakSet()

    def add(self, store: DenseStore) -> None:
        with self._lock:
            self._stores.add(store)

    def remove(self, store: DenseStore) -> None:
        with self._lock:
            self._stores.discard(store)

    def collect(self) -> Iterator[prometheus_client.Metric]:
        version = GaugeMetricFamily("monolith_dense_version", "Version of the dense parameters.")
        parameters = GaugeMetricFamily("monolith_dense_parameters", "Dense parameter values held.")
        size = GaugeMetricFamily("monolith_dense_bytes", "Bytes held by dense parameters and optimizer state.")
        pushes = CounterMetricFamily("monolith_dense_pushes", "Gradient pushes applied since start.")
        rejected = CounterMetricFamily("monolith_dense_rejected_pushes", "Gradient pushes rejected since start.")
        with self._lock:
            stores = list(self._stores)
        for store in stores:
            s = store.stats()
            version.add_metric([], s.version)
            parameters.add_metric([], s.parameters)
            size.add_metric([], s.bytes)
            pushes.add_metric([], s.pushes)
            rejected.add_metric([], s.rejected_pushes)
        yield from (version, parameters, size, pushes, rejected)

    def describe(self) -> Iterator[prometheus_client.Metric]:
        # Describing without collecting keeps registration free of store reads.
        return iter(())


STORES = _StoreCollector()
prometheus_client.REGISTRY.register(STORES)
