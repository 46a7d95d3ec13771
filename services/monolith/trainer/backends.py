"""A trainer's parameters in this process: the in-memory side of `monolith.model.backends`.

`LocalEmbeddings` and `LocalDense` implement the sparse and dense protocols with the same
table engine and optimizers the PS services run, for the single-process reference run
that distributed training is measured against.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from monolith.dense_ps.store import DenseStore
from monolith.embedding.concurrency import VersionClock
from monolith.embedding.config import TableConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding.table import EmbeddingTable
from monolith.embedding.table_kernels import sum_duplicates, sum_duplicates_and_squares
from monolith.embedding_ps.routing import dedupe_and_route, dedupe_and_route_tables, unpack_rows
from monolith.model.config import DenseOptimizerConfig


class LocalEmbeddings:
    """In-memory tables with the sharded client's semantics (dedupe, occurrence counts).

    Ids are deduped, counted and put back in order by the same kernels the sharded client
    runs (with one shard), so a comparison of the two measures the network, not two dedupes.
    """

    def __init__(self, tables: tuple[TableConfig, ...]) -> None:
        self.tables = {t.name: EmbeddingTable(t) for t in tables}
        self._salts = {t.name: np.uint64(stable_hash64(t.name)) for t in tables}
        self._clock = VersionClock()

    @property
    def version(self) -> int:
        """The newest version a mutation of these tables took."""
        return self._clock.current

    def follow(self, source: LocalEmbeddings, since: int) -> int:
        """Applies the changes `source`'s tables made after version `since`, as a serving shard's sync does.

        Rows (embeddings only, no optimizer state) overwrite, deleted ids are deleted;
        since 0 every live row is copied. The tables must be `source`'s configs.

        Returns:
            `source`'s version these tables are now complete up to: the `since` of the next call.
        """
        version = source.version
        with self._clock.mutation() as mine:
            for name, table in source.tables.items():
                if since <= 0:
                    rows, deleted = list(table.export(0, include_state=False, max_rows=1 << 20)), None
                else:
                    changed, deleted = table.changes_since(since, include_state=False)
                    rows = [changed]
                if deleted is not None and deleted.size:
                    self.tables[name].delete(deleted, mine)
                for batch in rows:
                    self.tables[name].upsert(batch, mine)
        return version

    def _dedupe(self, name: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unique ids, position in unique of each id, occurrences of each unique id)."""
        flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        unique, inverse, counts, _ = dedupe_and_route(flat, self._salts[name], np.uint64(1))
        return unique, inverse, counts

    def lookup(
        self,
        features: Mapping[str, np.ndarray],
        training: bool = False,
        update_time: float = 0.0,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        # In memory, `timeout` bounds nothing. As the sharded client does it: every table routed (to one shard) in one kernel
        # call, the rows put back in input order by another.
        names = tuple(features)
        arrays = [np.ascontiguousarray(ids, dtype=np.int64).reshape(-1) for ids in features.values()]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.shape[0] for a in arrays], out=offsets[1:])
        dims = np.array([self.tables[n].dim for n in names], dtype=np.int64)
        salts = np.array([self._salts[n] for n in names], dtype=np.uint64)
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        unique, counts, bounds, source = dedupe_and_route_tables(flat, offsets, salts, dims, np.uint64(1))
        blocks = []
        with self._clock.mutation() as version:
            for t, name in enumerate(names):
                ids, table = unique[bounds[t] : bounds[t + 1]], self.tables[name]
                if training:
                    blocks.append(table.lookup_train(ids, counts[bounds[t] : bounds[t + 1]], update_time, version))
                else:
                    blocks.append(table.lookup(ids))
        values = np.concatenate([b.reshape(-1) for b in blocks]) if blocks else np.zeros(0, np.float32)
        out = np.empty(int(np.dot(np.diff(offsets), dims)), dtype=np.float32)
        unpack_rows(values, source, offsets, dims, out)
        result, start = {}, 0
        for name, n, dim in zip(names, np.diff(offsets).tolist(), dims.tolist()):
            result[name] = out[start : start + n * dim].reshape(n, dim)
            start += n * dim
        return result

    def apply_and_lookup(
        self,
        gradients: Mapping[str, tuple[np.ndarray, np.ndarray]],
        update_time: float,
        features: Mapping[str, np.ndarray],
        training: bool = True,
        lookup_update_time: float = 0.0,
    ) -> tuple[int, int, dict[str, np.ndarray]]:
        applied, filtered = self.apply_gradients(gradients, update_time)
        return applied, filtered, self.lookup(features, training, lookup_update_time)

    def apply_gradients(
        self, gradients: Mapping[str, tuple[np.ndarray, np.ndarray]], update_time: float = 0.0
    ) -> tuple[int, int]:
        applied = filtered = 0
        with self._clock.mutation() as version:
            for name, (ids, grads) in gradients.items():
                # As the sharded client sends them: summed per id, with the sums of their squares.
                unique, inverse, _ = self._dedupe(name, ids)
                g = np.ascontiguousarray(grads, dtype=np.float32).reshape(inverse.shape[0], -1)
                if not self.tables[name].config.optimizer.uses_occurrence_squares or unique.shape[0] == inverse.shape[0]:
                    sums, squares = sum_duplicates(inverse, g, unique.shape[0]), None
                else:
                    sums, squares = sum_duplicates_and_squares(inverse, g, unique.shape[0])
                a, f = self.tables[name].apply_gradients(unique, sums, update_time, version, squares)
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

    def push_pull(self, grads: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        return self.store.push_pull(dict(grads))
