"""One collisionless embedding table: what a table is, with no sharding or gRPC.

Every distinct id owns one row of a contiguous float32 arena `[embedding | optimizer
state]`, with its last update time. Rows are found through a seeded linear-probing index
(see `id_map`), created on demand when the admission filter lets an id in, updated by the
table's optimizer, evicted when not updated for `expire_after`, and exported/imported as
changes since a version.

Time is data time, as in the paper: rows are stamped with the update time the caller
passes (the event time of the batch's examples), and expiry compares rows with the newest
update time the table has seen (its clock), so a replay of old data expires rows as the
live system would have, and a pause in training expires nothing. The wall clock never
enters: a mutation without a time (0) stamps the table's clock as it is and does not move
it, so an untimed update after training on 1997 data cannot make the next sweep evict
every row.

Changes since a version, in time proportional to the changes: the kernels append the
row of every creation, update and import to a change log, and the table's `ChangeLog`
(see change_log) keeps the marks that map versions to log positions, compacts the log,
and remembers deleted ids.

Thread safety: reads take a shared lock, mutations an exclusive one (see concurrency);
the expiry sweep takes it one bounded window at a time. The same lock protects the
change log's bookkeeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, ContextManager, Iterator

import numpy as np

from monolith.embedding import id_map, table_kernels
from monolith.embedding.change_log import ChangeLog
from monolith.embedding.concurrency import ReadWriteLock
from monolith.embedding.config import TableConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding.row_math import OPTIMIZER_CODES, hyper_parameters, initializer_params
from monolith.embedding.row_math import TableParams
from monolith.embedding.table_kernels import FREE, NEWEST_TIME, PendingArrays, TableArrays

GROWTH = 1.125  # arena growth factor: small, so spare rows cost little memory (copies are cheap)
MIN_GROWTH_ROWS = 1024
EXPIRY_WINDOW_ROWS = 65_536  # rows one write-locked expiry step scans at most
EXPIRY_WINDOW_EVICTIONS = 4096  # rows one write-locked expiry step frees at most
EXPIRY_SCAN_ROWS = 1 << 20  # rows one read-locked search for expired rows scans at most


@dataclasses.dataclass(frozen=True)
class RowBatch:
    """Rows of one table, as exported or to import.

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
    """Sizes and counters of one table, and its data clock (`newest_update_time`)."""

    rows: int
    bytes: int
    admissions: int
    filtered_gradients: int
    evictions: int
    pending_ids: int
    newest_update_time: int = 0


class EmbeddingTable:
    """A growable, collisionless id → embedding table.

    Args:
        config: the table's configuration.
        initial_capacity: rows to allocate up front.
    """

    def __init__(self, config: TableConfig, initial_capacity: int = 1024) -> None:
        self.config = config
        self.dim = config.dim
        self.state_width = config.optimizer.state_width(config.dim)
        self.width = self.dim + self.state_width
        self._lock = ReadWriteLock()
        salt = stable_hash64(config.name)
        # Index seeds are random per table so no id set can be built to collide in advance;
        # the initializer seed is fixed per (table, seed) so re-created rows start identical.
        rng = np.random.default_rng()
        init_kind, init_scale = initializer_params(config.initializer)
        filter_kind = table_kernels.FILTER_CODES[config.admission.filter]
        threshold = int(config.admission.threshold)
        self._params = TableParams(
            dim=int(self.dim),
            init_kind=int(init_kind),
            init_scale=float(init_scale),
            init_seed=np.uint64(stable_hash64(f"{config.name}/{config.seed}") ^ salt),
            opt_kind=int(OPTIMIZER_CODES[config.optimizer.kind]),
            hp=hyper_parameters(config.optimizer),
            filter_kind=int(table_kernels.FILTER_NONE if threshold <= 1 else filter_kind),
            threshold=threshold,
            admit_probability=float(1.0 - 0.05 ** (1.0 / threshold)),
        )

        capacity = max(8, int(initial_capacity))
        self._t = TableArrays(
            index=np.full(id_map.index_capacity_for(capacity), -1, dtype=np.int32),
            keys=np.zeros(capacity, dtype=np.int64),
            meta=id_map.new_meta(table_kernels.META_SIZE),
            values=_cache_aligned_zeros((capacity, self.width)),
            update_time=np.full(capacity, FREE, dtype=np.uint32),
            log=np.zeros(capacity, dtype=np.int32),
            seed=np.uint64(rng.integers(0, 2**63)),
        )
        self._pending = PendingArrays(
            index=np.full(8, -1, dtype=np.int32),
            keys=np.zeros(0, dtype=np.int64),
            meta=id_map.new_meta(),
            count=np.zeros(0, dtype=np.int32),
            time=np.zeros(0, dtype=np.uint32),
            seed=np.uint64(rng.integers(0, 2**63)),
        )

        self._change_log = ChangeLog(config.name)  # marks and deletions; guarded by self._lock

        self._max_update_time = 0
        self._admissions = 0
        self._filtered = 0
        self._evictions = 0

    # ----------------------------------------------------------------- reads

    def __len__(self) -> int:
        return int(self._t.meta[id_map.META_LIVE])

    @property
    def capacity(self) -> int:
        """Rows the arena holds before it must grow."""
        return int(self._t.keys.shape[0])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Embeddings of ids; zeros for ids without a row. Changes nothing."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((ids.shape[0], self.dim), dtype=np.float32)
        with self._lock.read():
            table_kernels.lookup_into(self._t, ids, out)
        return out

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id has a row."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        rows = np.empty(ids.shape[0], dtype=np.int64)
        with self._lock.read():
            id_map.find_many(self._t, ids, rows)
        return rows >= 0

    # ------------------------------------------------------------- mutations

    def lookup_train(self, ids: np.ndarray, counts: np.ndarray | None, now: float, version: int) -> np.ndarray:
        """Training lookup: counts occurrences, creates rows for admitted ids.

        Args:
            ids: int64 [n].
            counts: int32 [n] occurrences of each id in the batch, or None for one each.
            now: data time stamped on created rows (seconds since the epoch); 0 (no time
                given) stamps the table's clock without moving it.
            version: the shard version of this mutation.

        Returns:
            float32 [n, dim]; zeros for ids the filter holds back.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((ids.shape[0], self.dim), dtype=np.float32)
        with self._lock.read():
            if table_kernels.lookup_into(self._t, ids, out) == 0:
                return out
        counts = np.ones(ids.shape[0], dtype=np.int32) if counts is None else np.ascontiguousarray(counts, np.int32)
        if counts.shape != ids.shape:
            raise ValueError(f"{counts.shape[0]} counts for {ids.shape[0]} ids")
        stamp = self._stamp(now)
        with self._lock.write():
            self._begin_mutation(version, ids.shape[0])
            if self._params.filter_kind == table_kernels.FILTER_COUNTING:
                self._reserve_pending(ids.shape[0])
            admitted, rows = table_kernels.lookup_or_create(
                self._t, self._params, self._pending, ids, counts, stamp, np.int64(version)
            )
            self._admissions += admitted
            table_kernels.gather(self._t.values, rows, out)
        return out

    def apply_gradients(self, ids: np.ndarray, grads: np.ndarray, now: float, version: int,
                        squares: np.ndarray | None = None) -> tuple[int, int]:  # fmt: skip
        """Applies gradients with the table's optimizer; duplicate ids have theirs summed.

        Updated rows are stamped with `now` (data time; 0 stamps the table's clock, as in
        `lookup_train`).

        Args:
            ids: int64 [n] ids, duplicates allowed.
            grads: float32 [n, dim] a gradient per id.
            now: the data time stamped on updated rows.
            version: the shard version of this mutation.
            squares: float32 [n, dim], per id the sum of the squares of the per-occurrence
                gradients summed into its gradient; Adagrad and FTRL accumulate these, as
                a step per occurrence would. None: they accumulate each (summed)
                gradient's square.

        Returns:
            (rows updated, gradients dropped because their id has no row).
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        grads = np.ascontiguousarray(grads, dtype=np.float32).reshape(ids.shape[0], self.dim)
        if squares is not None:
            squares = np.ascontiguousarray(squares, dtype=np.float32).reshape(ids.shape[0], self.dim)
        unique, inverse = np.unique(ids, return_inverse=True)
        if unique.shape[0] != ids.shape[0]:
            inverse = inverse.astype(np.int64)
            if squares is None:  # each row is one occurrence
                grads, squares = table_kernels.sum_duplicates_and_squares(inverse, grads, unique.shape[0])
            else:
                grads = table_kernels.sum_duplicates(inverse, grads, unique.shape[0])
                squares = table_kernels.sum_duplicates(inverse, squares, unique.shape[0])
            ids = unique
        if squares is None:
            squares = np.zeros((0, self.dim), np.float32)
        stamp = self._stamp(now)
        with self._lock.write():
            self._begin_mutation(version, 0, log_entries=ids.shape[0])
            missing = table_kernels.apply_gradients(self._t, self._params, ids, grads, squares, stamp)
            self._filtered += missing
        return ids.shape[0] - missing, missing

    def expire(self, version: int, now: float | None = None) -> int:
        """Evicts rows not updated for `expire_after` seconds before `now`.

        The sweep runs in bounded windows (`expire_in_windows`), each holding the write
        lock only briefly, so lookups keep flowing during a sweep of a large table.

        Args:
            version: the shard version stamped on the deletions.
            now: the reference time; default the newest update time the table has seen.

        Returns:
            Rows evicted. Pending admission counts that old are forgotten as well.
        """
        return self.expire_in_windows(now, lambda: contextlib.nullcontext(version))

    def expire_in_windows(self, now: float | None, window: Callable[[], ContextManager[int]]) -> int:
        """`expire`, with each window run inside `window()`, stamped with the version it yields.

        A shard passes a context that holds its gate shared and takes a fresh version, so
        an export can come between any two windows. Stretches of the arena with
        nothing to evict are skipped under the read lock, taking no version.

        Returns:
            Rows evicted.
        """
        if self.config.expire_after is None:
            return 0
        reference = self._max_update_time if now is None else now
        cutoff = np.uint32(max(0, min(2**32 - 1, math.floor(reference - self.config.expire_after) + 1)))
        evicted = np.empty(EXPIRY_WINDOW_EVICTIONS, dtype=np.int64)
        total = 0
        position = self._next_expired(cutoff, 0)
        while position >= 0:
            self._prepare_deletion_room(EXPIRY_WINDOW_EVICTIONS)
            with window() as version, self._lock.write():
                self._begin_mutation(version, 0)
                count, position = table_kernels.expire_window(
                    self._t, self._pending, cutoff, position, EXPIRY_WINDOW_ROWS, evicted
                )
                self._change_log.log_deletions(evicted[:count], version)
                self._evictions += count
            total += count
            if position >= 0:
                position = self._next_expired(cutoff, position)
        return total

    def upsert(self, batch: RowBatch, version: int) -> None:
        """Imports rows: embeddings (and state, if the batch is full width) overwrite."""
        ids = np.ascontiguousarray(batch.ids, dtype=np.int64)
        values = np.ascontiguousarray(batch.values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] not in (self.dim, self.width) or values.shape[0] != ids.shape[0]:
            raise ValueError(f"rows of shape {values.shape} do not fit table {self.config.name!r} (dim {self.dim})")
        times = np.ascontiguousarray(batch.update_times, dtype=np.uint32)
        if times.shape != ids.shape:
            raise ValueError(f"{times.shape[0]} update times for {ids.shape[0]} rows")
        with self._lock.write():
            self._begin_mutation(version, ids.shape[0])
            table_kernels.upsert_rows(self._t, self._params, ids, values, times)
            if times.shape[0]:
                self._max_update_time = max(self._max_update_time, min(int(times.max()), NEWEST_TIME))

    def delete(self, ids: np.ndarray, version: int) -> int:
        """Deletes the rows of ids (as an import of deletions); returns how many existed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock.write():
            self._begin_mutation(version, 0)
            count = table_kernels.delete_ids(self._t, ids)
            self._change_log.log_deletions(ids, version)
        return count

    # ---------------------------------------------------------------- export

    def export(self, since: int, include_state: bool, max_rows: int) -> Iterator[RowBatch]:
        """Rows changed after version `since`, in batches of at most max_rows.

        Since 0, the arena is scanned in windows, each under the read lock, so a full
        export neither copies the table whole nor blocks writers for long. Since a later
        version, only the change log from the matching mark on is read: O(rows changed).
        Values are read batch by batch, so rows changed while the export runs may or may
        not be included; a later export since a version taken before this one has them.
        """
        width = self.width if include_state else self.dim
        if since <= 0:
            start = 0
            while True:
                with self._lock.read():
                    high = int(self._t.meta[id_map.META_HIGH])
                    if start >= high:
                        return
                    stop = min(high, start + max_rows)
                    rows = table_kernels.live_rows(self._t, start, stop)
                    batch = self._rows_batch(rows, width)
                start = stop
                if rows.shape[0]:
                    yield batch
        with self._lock.read():
            rows = self._change_log.changed_rows(self._t, since)
        for start in range(0, rows.shape[0], max_rows):
            with self._lock.read():
                # A row freed since the log was read is no change to send (its deletion is).
                part = rows[start : start + max_rows]
                part = part[self._t.update_time[part] != FREE]
                batch = self._rows_batch(part, width)
            if part.shape[0]:
                yield batch

    def deleted_since(self, since: int) -> np.ndarray:
        """Ids deleted (expired or deleted by import) after version `since`.

        Raises:
            LookupError: deletions after `since` were dropped from the bounded log; the
                consumer needs a full export instead.
        """
        with self._lock.read():
            return self._change_log.deleted_since(self._t, since)

    def change_count(self, since: int) -> int:
        """An upper bound on the rows and deletions an export since `since` would list:
        the change-log and deletion-log entries after its mark. O(1)."""
        with self._lock.read():
            return self._change_log.change_count(self._t, since)

    def changes_since(self, since: int, include_state: bool) -> tuple[RowBatch, np.ndarray]:
        """Every row changed and id deleted after version `since` (> 0), copied now, at once.

        O(changes). A shard calls it for each table while no mutation is in flight, so
        an export holds each mutation entirely or not at all.

        Returns:
            (the changed rows, the deleted ids).

        Raises:
            LookupError: as `deleted_since`.
        """
        width = self.width if include_state else self.dim
        with self._lock.read():
            deleted = self._change_log.deleted_since(self._t, since)
            return self._rows_batch(self._change_log.changed_rows(self._t, since), width), deleted

    def stats(self) -> TableStats:
        """Live rows, bytes held, and the admission/filter/eviction counters."""
        with self._lock.read():
            arrays = (
                *(a for a in self._t if isinstance(a, np.ndarray)),
                *(a for a in self._pending if isinstance(a, np.ndarray)),
            )
            return TableStats(
                rows=int(self._t.meta[id_map.META_LIVE]),
                bytes=sum(a.nbytes for a in arrays) + self._change_log.nbytes,
                admissions=self._admissions,
                filtered_gradients=self._filtered,
                evictions=self._evictions,
                pending_ids=int(self._pending.meta[id_map.META_LIVE]),
                newest_update_time=self._max_update_time,
            )

    # -------------------------------------------------------------- internal

    @property
    def newest_update_time(self) -> int:
        """The table's data clock: the newest update time it has seen (0 before any)."""
        return self._max_update_time

    def _stamp(self, now: float) -> np.uint32:
        """Seconds as stored per row; a time advances the table's data clock.

        No time (`now` <= 0) stamps the clock as it is: the rows count as updated at the
        newest time the table knows, and the clock does not move.
        """
        if now <= 0:
            return np.uint32(self._max_update_time)
        stamp = int(min(now, NEWEST_TIME))
        self._max_update_time = max(self._max_update_time, stamp)
        return np.uint32(stamp)

    def _begin_mutation(self, version: int, new_rows: int, log_entries: int | None = None) -> None:
        """Mark bookkeeping and room for a mutation (caller holds the write lock).

        Args:
            version: the mutation's version.
            new_rows: rows it may create.
            log_entries: change-log entries it may append; default new_rows.
        """
        self._change_log.begin_mutation(self._t, version)
        if new_rows:
            self._reserve(new_rows)
        entries = new_rows if log_entries is None else log_entries
        if entries:
            # Only mutations that append compact the log: an expiry window or a deletion
            # never pays for it, so a sweep's write-locked steps stay short.
            self._reserve_log(entries)

    def _rows_batch(self, rows: np.ndarray, width: int) -> RowBatch:
        return RowBatch(
            ids=self._t.keys[rows],
            values=self._t.values[rows, :width],
            update_times=self._t.update_time[rows],
        )

    def _next_expired(self, cutoff: np.uint32, position: int) -> int:
        """The first position >= `position` with something to expire, or -1.

        Searched under the read lock (lookups go on), a bounded stretch at a time so
        that writers wait little.
        """
        while True:
            with self._lock.read():
                extent = max(int(self._t.meta[id_map.META_HIGH]), int(self._pending.meta[id_map.META_HIGH]))
                if position >= extent:
                    return -1
                stop = min(extent, position + EXPIRY_SCAN_ROWS)
                found = table_kernels.first_expired(self._t, self._pending, cutoff, position, stop)
            if found < stop:
                return found
            position = stop

    def _reserve(self, extra: int) -> None:
        """Grows the arena and index so `extra` more rows fit (caller holds the write lock)."""
        t = self._t
        live = int(t.meta[id_map.META_LIVE])
        high = int(t.meta[id_map.META_HIGH])
        need = high + max(0, extra - (high - live))
        capacity = t.keys.shape[0]
        if need > capacity:
            capacity = max(need, int(capacity * GROWTH), capacity + MIN_GROWTH_ROWS)
            t = t._replace(
                keys=_resized(t.keys, capacity, high, 0),
                values=_resized(t.values, capacity, high, 0.0, cache_aligned=True),
                update_time=_resized(t.update_time, capacity, high, FREE),
            )
        if live + extra > id_map.MAX_LOAD * t.index.shape[0]:
            t = t._replace(index=np.empty(id_map.index_capacity_for(live + extra), dtype=np.int32))
            id_map.rebuild_index(t, t.update_time[:high] != FREE)
        self._t = t

    def _reserve_log(self, extra: int) -> None:
        """Makes room for `extra` change-log entries, compacting the log when it is long."""
        t = self._t
        self._change_log.compact_if_long(t)
        length = int(t.meta[table_kernels.META_LOG])
        capacity = t.log.shape[0]
        if length + extra > capacity:
            capacity = max(length + extra, int(capacity * GROWTH), capacity + MIN_GROWTH_ROWS)
            self._t = t._replace(log=_resized(t.log, capacity, length))

    def _reserve_pending(self, extra: int) -> None:
        p = self._pending
        live = int(p.meta[id_map.META_LIVE])
        high = int(p.meta[id_map.META_HIGH])
        need = high + max(0, extra - (high - live))
        capacity = p.keys.shape[0]
        if need > capacity:
            capacity = max(need, int(capacity * GROWTH), capacity + MIN_GROWTH_ROWS)
            p = p._replace(
                keys=_resized(p.keys, capacity, high, 0),
                count=_resized(p.count, capacity, high, 0),
                time=_resized(p.time, capacity, high, 0),
            )
        if live + extra > id_map.MAX_LOAD * p.index.shape[0]:
            p = p._replace(index=np.empty(id_map.index_capacity_for(live + extra), dtype=np.int32))
            id_map.rebuild_index(p, p.count[:high] > 0)
        self._pending = p

    def _prepare_deletion_room(self, extra: int) -> None:
        """Allocates a larger deletion log now, without the lock, if `extra` more deletions
        would need one: faulting in megabytes of fresh pages takes tens of milliseconds,
        which the write-locked step that uses it then does not spend."""
        spare = self._change_log.deletion_spare(extra)
        if spare is not None:
            # Published only once filled, and under the lock `log_deletions` runs under, so
            # a mutation never takes (and fills) a spare this sweep is still writing.
            with self._lock.write():
                self._change_log.publish_spare(spare)


def _cache_aligned_zeros(shape: tuple[int, int]) -> np.ndarray:
    """A float32 array starting on a 64-byte cache line.

    numpy only aligns to 16 bytes; a 16-float embedding at a 16-byte offset straddles two
    cache lines, and a random lookup then misses twice (measured ~10% slower lookups).
    """
    count = shape[0] * shape[1]
    buffer = np.zeros(count + 16, dtype=np.float32)
    offset = (-buffer.ctypes.data % 64) // 4
    return buffer[offset : offset + count].reshape(shape)


def _resized(array: np.ndarray, capacity: int, used: int, fill: float | None = None,
             cache_aligned: bool = False) -> np.ndarray:  # fmt: skip
    """A copy of array with `capacity` rows: the first `used` kept, the rest set to fill.

    With no fill the rest is left untouched, so its pages are only faulted in as entries
    are appended, not all at once under the write lock (~30 ms for a 16 MB log).
    """
    if cache_aligned:
        out = _cache_aligned_zeros((capacity, array.shape[1]))
    else:
        out = np.empty((capacity,) + array.shape[1:], dtype=array.dtype)
    out[:used] = array[:used]
    if fill is not None:
        out[used:] = fill
    return out
