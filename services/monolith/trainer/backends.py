"""Where a trainer's parameters live: on the PS services, or in this process.

The trainer talks to two small protocols. `ShardedEmbeddingClient` and `DensePSClient`
implement them over gRPC; `LocalEmbeddings` and `LocalDense` implement them in memory
with the same table engine and optimizers, for the single-process reference run that
distributed training is measured against.
"""

from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np

from monolith.dense_ps.optimizers import DenseOptimizerConfig
from monolith.dense_ps.store import DenseStore
from monolith.embedding.concurrency import VersionClock
from monolith.embedding.config import SlotConfig
from monolith.embedding.table import EmbeddingTable


class SparseBackend(Protocol):
    """Embedding lookups and sparse gradient pushes."""

    def lookup(
        self, features: Mapping[str, np.ndarray], training: bool = False, update_time: float = 0.0
    ) -> dict[str, np.ndarray]: ...

    def apply_gradients(
        self, gradients: Mapping[str, tuple[np.ndarray, np.ndarray]], update_time: float = 0.0
    ) -> tuple[int, int]: ...


class DenseBackend(Protocol):
    """Dense parameter init, pull and push."""

    def init(self, tensors: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]: ...

    def pull(self, if_newer_than: int = 0) -> tuple[int, dict[str, np.ndarray] | None]: ...

    def push(self, grads: Mapping[str, np.ndarray]) -> int: ...


class LocalEmbeddings:
    """In-memory tables with the sharded client's semantics (dedupe, occurrence counts)."""

    def __init__(self, tables: tuple[SlotConfig, ...]) -> None:
        self.tables = {t.name: EmbeddingTable(t) for t in tables}
        self._clock = VersionClock()

    def lookup(
        self, features: Mapping[str, np.ndarray], training: bool = False, update_time: float = 0.0
    ) -> dict[str, np.ndarray]:
        out = {}
        with self._clock.mutation() as version:
            for name, ids in features.items():
                unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
                table = self.tables[name]
                if training:
                    rows = table.lookup_train(unique, counts.astype(np.int32), update_time, version)
                else:
                    rows = table.lookup(unique)
                out[name] = rows[inverse]
        return out

    def apply_gradients(
        self, gradients: Mapping[str, tuple[np.ndarray, np.ndarray]], update_time: float = 0.0
    ) -> tuple[int, int]:
        applied = filtered = 0
        with self._clock.mutation() as version:
            for name, (ids, grads) in gradients.items():
                a, f = self.tables[name].apply_gradients(ids, grads, update_time, version)
                applied += a
                filtered += f
        return applied, filtered


class LocalDense:
    """A DenseStore in this process, behind the dense-PS client's interface."""

    def __init__(self, optimizer: DenseOptimizerConfig) -> None:
        self.store = DenseStore(optimizer)

    def init(self, tensors: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        return self.store.init(dict(tensors))

    def pull(self, if_newer_than: int = 0) -> tuple[int, dict[str, np.ndarray] | None]:
        return self.store.pull((), if_newer_than)

    def push(self, grads: Mapping[str, np.ndarray]) -> int:
        return self.store.push(dict(grads))
