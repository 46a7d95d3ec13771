"""One slot's collisionless embedding table: what a table is, with no sharding or gRPC.

Every distinct id owns one row of a contiguous float32 arena `[embedding | optimizer
state]`, with per-row metadata (the shard version of its last change, its last update
time). Rows are found through a seeded linear-probing index (see `id_map`), created on
demand when the admission filter lets an id in, updated by the slot's optimizer, evicted
when not updated for `expire_after`, and exported/imported as changes since a version.

Time is data time, as in the paper: rows are stamped with the update time the caller
passes (the batch's example time, or the wall clock), and expiry compares rows with the
newest update time the table has seen, so a replay of old data expires rows as the live
system would have, and a pause in training expires nothing.

Thread safety: reads take a shared lock, mutations an exclusive one (see concurrency).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from monolith.embedding import id_map, table_kernels
from monolith.embedding.concurrency import ReadWriteLock
from monolith.embedding.config import SlotConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding.row_math import OPTIMIZER_CODES, hyper_parameters, initializer_params

MAX_DELETION_LOG = 1 << 20  # deletions remembered per table; older ones need a full export
GROWTH = 1.125  # arena growth factor: small, so spare rows cost little memory (copies are cheap)
MIN_GROWTH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class RowBatch:
    """Rows of one slot, as exported or to import.

    Attributes:
        ids: int64 [n].
        values: float32 [n, width]: embeddings, optionally followed by optimizer state.
        update_times: uint32 [n], seconds since the epoch.
    """

    ids: np.ndarray
    values: np.ndarray
    update_times: np.ndarray


@dataclasses.dataclass(frozen=True)
class TableStats:
    """Sizes and counters of one table."""

    rows: int
    bytes: int
    admissions: int
    filtered_gradients: int
    evictions: int
    pending_ids: int


class EmbeddingTable:
    """A growable, collisionless id → embedding table for one slot."""

    def __init__(self, config: SlotConfig, initial_capacity: int = 1024) -> None:
        self.config = config
        self.dim = config.dim
        self.state_width = config.optimizer.state_width(config.dim)
        self.width = self.dim + self.state_width
        self._lock = ReadWriteLock()
        salt = stable_hash64(config.name)
        # Index seeds are random per table so no id set can be built to collide in advance;
        # the initializer seed is fixed per (slot, seed) so re-created rows start identical.
        rng = np.random.default_rng()
        self._seed = np.uint64(rng.integers(0, 2**63))
        self._pending_seed = np.uint64(rng.integers(0, 2**63))
        self._slot_seed = np.uint64(stable_hash64(f"{config.name}/{config.seed}") ^ salt)
        self._init_kind, self._init_scale = initializer_params(config.initializer)
        self._opt_kind = OPTIMIZER_CODES[config.optimizer.kind]
        self._hp = hyper_parameters(config.optimizer)
        self._filter_kind = table_kernels.FILTER_CODES[config.admission.filter]
        self._threshold = config.admission.threshold
        if self._threshold <= 1:
            self._filter_kind = table_kernels.FILTER_NONE
        self._admit_probability = 1.0 - 0.05 ** (1.0 / self._threshold)

        capacity = max(8, int(initial_capacity))
        self._meta = id_map.new_meta()
        self._keys = np.zeros(capacity, dtype=np.int64)
        self._values = _cache_aligned_zeros((capacity, self.width))
        self._version = np.full(capacity, -1, dtype=np.int64)
        self._update_time = np.zeros(capacity, dtype=np.uint32)
        self._index = np.full(id_map.index_capacity_for(capacity), -1, dtype=np.int32)

        self._p_meta = id_map.new_meta()
        self._p_keys = np.zeros(0, dtype=np.int64)
        self._p_count = np.zeros(0, dtype=np.int32)
        self._p_time = np.zeros(0, dtype=np.uint32)
        self._p_index = np.full(8, -1, dtype=np.int32)

        self._deleted_ids = np.zeros(0, dtype=np.int64)
        self._deleted_versions = np.zeros(0, dtype=np.int64)
        self._num_deleted = 0
        self._deletions_floor = 0  # deletions at or below this version were forgotten

        self._max_update_time = 0
        self._admissions = 0
        self._filtered = 0
        self._evictions = 0

    # ----------------------------------------------------------------- reads

    def __len__(self) -> int:
        return int(self._meta[id_map.META_LIVE])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Embeddings of ids; zeros for ids without a row. Changes nothing."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((ids.shape[0], self.dim), dtype=np.float32)
        with self._lock.read():
            table_kernels.lookup_into(self._index, self._keys, self._values, self._seed, ids, out)
        return out

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id has a row."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        rows = np.empty(ids.shape[0], dtype=np.int64)
        with self._lock.read():
            id_map.find_many(self._index, self._keys, self._seed, ids, rows)
        return rows >= 0

    # ------------------------------------------------------------- mutations

    def lookup_train(self, ids: np.ndarray, counts: np.ndarray | None, now: float, version: int) -> np.ndarray:
        """Training lookup: counts occurrences, creates rows for admitted ids.

        Args:
            ids: int64 [n].
            counts: int32 [n] occurrences of each id in the batch, or None for one each.
            now: update time stamped on created rows (seconds since the epoch).
            version: the shard version of this mutation.

        Returns:
            float32 [n, dim]; zeros for ids the filter holds back.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((ids.shape[0], self.dim), dtype=np.float32)
        with self._lock.read():
            if table_kernels.lookup_into(self._index, self._keys, self._values, self._seed, ids, out) == 0:
                return out
        rows = np.empty(ids.shape[0], dtype=np.int64)
        counts = np.ones(ids.shape[0], dtype=np.int32) if counts is None else np.ascontiguousarray(counts, np.int32)
        if counts.shape != ids.shape:
            raise ValueError(f"{counts.shape[0]} counts for {ids.shape[0]} ids")
        stamp = self._stamp(now)
        with self._lock.write():
            self._reserve(ids.shape[0])
            if self._filter_kind == table_kernels.FILTER_COUNTING:
                self._reserve_pending(ids.shape[0])
            admitted = table_kernels.lookup_or_create(
                self._index, self._keys, self._meta, self._values, self._version, self._update_time,
                self._seed, self.dim, self._init_kind, self._init_scale, self._slot_seed, self._opt_kind, self._hp,
                self._filter_kind, self._threshold, self._admit_probability,
                self._p_index, self._p_keys, self._p_meta, self._p_count, self._p_time, self._pending_seed,
                ids, counts, stamp, np.int64(version), rows,
            )  # fmt: skip
            self._admissions += admitted
            table_kernels.gather(self._values, rows, out)
        return out

    def apply_gradients(self, ids: np.ndarray, grads: np.ndarray, now: float, version: int) -> tuple[int, int]:
        """Applies gradients with the slot's optimizer; duplicate ids have theirs summed.

        Returns:
            (rows updated, gradients dropped because their id has no row).
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        grads = np.ascontiguousarray(grads, dtype=np.float32).reshape(ids.shape[0], self.dim)
        unique, inverse = np.unique(ids, return_inverse=True)
        if unique.shape[0] != ids.shape[0]:
            grads = table_kernels.sum_duplicates(inverse.astype(np.int64), grads, unique.shape[0])
            ids = unique
        stamp = self._stamp(now)
        with self._lock.write():
            missing = table_kernels.apply_gradients(
                self._index, self._keys, self._values, self._version, self._update_time, self._seed,
                self._opt_kind, self._hp, ids, grads, stamp, np.int64(version),
            )  # fmt: skip
            self._filtered += missing
        return ids.shape[0] - missing, missing

    def expire(self, version: int, now: float | None = None) -> int:
        """Evicts rows not updated for `expire_after` seconds before `now`.

        Args:
            version: the shard version stamped on the deletions.
            now: the reference time; default the newest update time the table has seen.

        Returns:
            Rows evicted. Pending admission counts that old are forgotten as well.
        """
        if self.config.expire_after is None:
            return 0
        reference = self._max_update_time if now is None else now
        cutoff = np.uint32(max(0, min(2**32 - 1, math.floor(reference - self.config.expire_after) + 1)))
        with self._lock.write():
            evicted = np.empty(int(self._meta[id_map.META_HIGH]), dtype=np.int64)
            count = table_kernels.expire_rows(
                self._index, self._keys, self._meta, self._version, self._update_time, self._seed, cutoff, evicted
            )
            self._log_deletions(evicted[:count], version)
            self._evictions += count
            table_kernels.expire_pending(
                self._p_index, self._p_keys, self._p_meta, self._p_count, self._p_time, self._pending_seed, cutoff
            )
        return count

    def upsert(self, batch: RowBatch, version: int) -> None:
        """Imports rows: embeddings (and state, if the batch is full width) overwrite."""
        ids = np.ascontiguousarray(batch.ids, dtype=np.int64)
        values = np.ascontiguousarray(batch.values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] not in (self.dim, self.width) or values.shape[0] != ids.shape[0]:
            raise ValueError(f"rows of shape {values.shape} do not fit slot {self.config.name!r} (dim {self.dim})")
        times = np.ascontiguousarray(batch.update_times, dtype=np.uint32)
        if times.shape != ids.shape:
            raise ValueError(f"{times.shape[0]} update times for {ids.shape[0]} rows")
        with self._lock.write():
            self._reserve(ids.shape[0])
            table_kernels.upsert_rows(
                self._index, self._keys, self._meta, self._values, self._version, self._update_time, self._seed,
                self.dim, self._opt_kind, self._hp, ids, values, times, np.int64(version),
            )  # fmt: skip
            if times.shape[0]:
                self._max_update_time = max(self._max_update_time, int(times.max()))

    def delete(self, ids: np.ndarray, version: int) -> int:
        """Deletes the rows of ids (as an import of deletions); returns how many existed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock.write():
            count = table_kernels.delete_ids(self._index, self._keys, self._meta, self._version, self._seed, ids)
            self._log_deletions(ids, version)
        return count

    # ---------------------------------------------------------------- export

    def export(self, since: int, include_state: bool, max_rows: int) -> Iterator[RowBatch]:
        """Rows changed after version `since`, in batches of at most max_rows.

        The arena is scanned in windows, each under the read lock, so an export of a large
        table neither copies it whole nor blocks writers for long. Rows changed while the
        export runs may or may not be included; they carry versions above the caller's
        `VersionClock.stable()` taken before the export, so the next export has them.
        """
        width = self.width if include_state else self.dim
        start = 0
        while True:
            with self._lock.read():
                high = int(self._meta[id_map.META_HIGH])
                if start >= high:
                    return
                stop = min(high, start + max_rows)
                rows = table_kernels.changed_rows(self._version, start, stop, np.int64(since))
                batch = RowBatch(
                    ids=self._keys[rows],
                    values=self._values[rows, :width],
                    update_times=self._update_time[rows],
                )
            start = stop
            if rows.shape[0]:
                yield batch

    def deleted_since(self, since: int) -> np.ndarray:
        """Ids deleted (expired or deleted by import) after version `since`.

        Raises:
            LookupError: deletions after `since` were dropped from the bounded log; the
                consumer needs a full export instead.
        """
        with self._lock.read():
            if since < self._deletions_floor:
                raise LookupError(
                    f"slot {self.config.name!r} remembers deletions only after version {self._deletions_floor}, "
                    f"not since {since}: a full export is needed"
                )
            n = self._num_deleted
            mask = self._deleted_versions[:n] > since
            return self._deleted_ids[:n][mask]

    def stats(self) -> TableStats:
        """Live rows, bytes held, and the admission/filter/eviction counters."""
        with self._lock.read():
            arrays = (
                self._keys, self._values, self._version, self._update_time, self._index,
                self._p_keys, self._p_count, self._p_time, self._p_index, self._deleted_ids, self._deleted_versions,
            )  # fmt: skip
            return TableStats(
                rows=int(self._meta[id_map.META_LIVE]),
                bytes=sum(a.nbytes for a in arrays),
                admissions=self._admissions,
                filtered_gradients=self._filtered,
                evictions=self._evictions,
                pending_ids=int(self._p_meta[id_map.META_LIVE]),
            )

    # -------------------------------------------------------------- internal

    def _stamp(self, now: float) -> np.uint32:
        """Seconds as stored per row; also advances the table's data clock."""
        stamp = int(min(max(now, 0), 2**32 - 1))
        self._max_update_time = max(self._max_update_time, stamp)
        return np.uint32(stamp)

    def _reserve(self, extra: int) -> None:
        """Grows the arena and index so `extra` more rows fit (caller holds the write lock)."""
        live = int(self._meta[id_map.META_LIVE])
        high = int(self._meta[id_map.META_HIGH])
        need = high + max(0, extra - (high - live))
        capacity = self._keys.shape[0]
        if need > capacity:
            capacity = max(need, int(capacity * GROWTH), capacity + MIN_GROWTH_ROWS)
            self._keys = _resized(self._keys, capacity, high, 0)
            self._values = _resized(self._values, capacity, high, 0.0, cache_aligned=True)
            self._version = _resized(self._version, capacity, high, -1)
            self._update_time = _resized(self._update_time, capacity, high, 0)
        if live + extra > id_map.MAX_LOAD * self._index.shape[0]:
            self._index = np.empty(id_map.index_capacity_for(live + extra), dtype=np.int32)
            id_map.rebuild_index(self._index, self._keys, self._version[:high] >= 0, self._seed)

    def _reserve_pending(self, extra: int) -> None:
        live = int(self._p_meta[id_map.META_LIVE])
        high = int(self._p_meta[id_map.META_HIGH])
        need = high + max(0, extra - (high - live))
        capacity = self._p_keys.shape[0]
        if need > capacity:
            capacity = max(need, int(capacity * GROWTH), capacity + MIN_GROWTH_ROWS)
            self._p_keys = _resized(self._p_keys, capacity, high, 0)
            self._p_count = _resized(self._p_count, capacity, high, 0)
            self._p_time = _resized(self._p_time, capacity, high, 0)
        if live + extra > id_map.MAX_LOAD * self._p_index.shape[0]:
            self._p_index = np.empty(id_map.index_capacity_for(live + extra), dtype=np.int32)
            id_map.rebuild_index(self._p_index, self._p_keys, self._p_count[:high] > 0, self._pending_seed)

    def _log_deletions(self, ids: np.ndarray, version: int) -> None:
        n, k = self._num_deleted, ids.shape[0]
        if k == 0:
            return
        if n + k > MAX_DELETION_LOG and n >= 2:
            # Forget the older half (by version) so the log stays bounded; consumers that
            # are further behind than that get a full export instead.
            order = np.argsort(self._deleted_versions[:n], kind="stable")
            keep = np.sort(order[n // 2 :])
            self._deletions_floor = max(self._deletions_floor, int(self._deleted_versions[order[n // 2 - 1]]))
            n = keep.shape[0]
            self._deleted_ids[:n] = self._deleted_ids[keep]
            self._deleted_versions[:n] = self._deleted_versions[keep]
        if n + k > self._deleted_ids.shape[0]:
            capacity = max(n + k, 2 * self._deleted_ids.shape[0], 1024)
            self._deleted_ids = _resized(self._deleted_ids, capacity, n, 0)
            self._deleted_versions = _resized(self._deleted_versions, capacity, n, 0)
        self._deleted_ids[n : n + k] = ids
        self._deleted_versions[n : n + k] = version
        self._num_deleted = n + k


def _cache_aligned_zeros(shape: tuple[int, int]) -> np.ndarray:
    """A float32 array starting on a 64-byte cache line.

    numpy only aligns to 16 bytes; a 16-float embedding at a 16-byte offset straddles two
    cache lines, and a random lookup then misses twice (measured ~10% slower lookups).
    """
    count = shape[0] * shape[1]
    buffer = np.zeros(count + 16, dtype=np.float32)
    offset = (-buffer.ctypes.data % 64) // 4
    return buffer[offset : offset + count].reshape(shape)


def _resized(array: np.ndarray, capacity: int, used: int, fill: float, cache_aligned: bool = False) -> np.ndarray:
    """A copy of array with `capacity` rows: the first `used` kept, the rest set to fill."""
    if cache_aligned:
        out = _cache_aligned_zeros((capacity, array.shape[1]))
    else:
        out = np.empty((capacity,) + array.shape[1:], dtype=array.dtype)
    out[:used] = array[:used]
    out[used:] = fill
    return out
