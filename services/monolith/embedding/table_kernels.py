"""Batched numba kernels over one table's arrays; they release the GIL.

A table's arrays travel to the kernels as one `TableArrays` named tuple (and the
counting filter's as one `PendingArrays`), its constants as one `TableParams`: the
kernels read fields by name, so two arrays of the same dtype cannot be passed in each
other's place. The tuples are rebuilt whenever the table reallocates an array.

The kernels never allocate table memory: the caller (`EmbeddingTable`) grows the arrays
first, for the worst case of the batch, so that a kernel can always take a new row and
append to the change log. A row is free when `update_time[row] == FREE`.

The change log (`log`, length in `meta[META_LOG]`) lists the row of every creation,
update and import, in order; every live row appears in it at least once. It is what
makes an incremental export cost O(rows changed) instead of a scan of the arena.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from monolith.embedding import id_map
from monolith.embedding.hashing import hash_id, mix64, to_unit_float
from monolith.embedding.row_math import TableParams, apply_gradient, init_embedding, init_state

FILTER_NONE, FILTER_COUNTING, FILTER_PROBABILISTIC = 0, 1, 2
FILTER_CODES = {"none": FILTER_NONE, "counting": FILTER_COUNTING, "probabilistic": FILTER_PROBABILISTIC}

FREE = np.uint32(0xFFFFFFFF)  # update time of a free row
NEWEST_TIME = 2**32 - 2  # update times of live rows are clamped to this

META_LOG = id_map.META_SIZE  # entries in the change log
META_SIZE = META_LOG + 1


class TableArrays(NamedTuple):
    """One table's storage, as the kernels see it.

    Attributes:
        index: int32 [power of two]: the id map's slots (see `id_map`).
        keys: int64 [capacity]: each row's id (the free list for free rows).
        meta: int64 [META_SIZE]: live rows, high-water mark, free-list head, log length.
        values: float32 [capacity, width]: embedding, then optimizer state.
        update_time: uint32 [capacity]: seconds of the row's last update; FREE if free.
        log: int32 [log capacity]: the change log (rows, in order of change).
        seed: uint64: the index's hash seed.
    """

    index: np.ndarray
    keys: np.ndarray
    meta: np.ndarray
    values: np.ndarray
    update_time: np.ndarray
    log: np.ndarray
    seed: np.uint64


class PendingArrays(NamedTuple):
    """The counting filter's occurrence counts of ids without a row yet.

    Attributes:
        index, keys, meta, seed: an id map, as in `TableArrays`.
        count: int32 [capacity]: occurrences so far; 0 for a free entry.
        time: uint32 [capacity]: when the id was last seen.
    """

    index: np.ndarray
    keys: np.ndarray
    meta: np.ndarray
    count: np.ndarray
    time: np.ndarray
    seed: np.uint64


# ------------------------------------------------------------------- reads


@numba.njit(nogil=True, cache=True)
def gather(values: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[i] = embedding of rows[i], or zeros where rows[i] == -1."""
    dim = out.shape[1]
    for i in range(rows.shape[0]):
        row = rows[i]
        # Element loops, not slice assignment: numba builds a view per slice, which costs
        # more than copying 16 floats.
        if row < 0:
            for j in range(dim):
                out[i, j] = 0.0
        else:
            for j in range(dim):
                out[i, j] = values[row, j]


@numba.njit(nogil=True, cache=True)
def lookup_into(t: TableArrays, ids: np.ndarray, out: np.ndarray) -> int:
    """out[i] = embedding of ids[i], zeros if it has no row; returns the number of misses.

    One call instead of find + gather: each numba call checks the types of its arguments,
    which costs as much as looking up a few hundred ids.
    """
    rows = np.empty(ids.shape[0], dtype=np.int64)
    misses = id_map.find_many(t, ids, rows)
    gather(t.values, rows, out)
    return misses


# --------------------------------------------------------------- mutations


@numba.njit(inline="always", nogil=True, cache=True)
def _log_change(t: TableArrays, row: np.int64) -> None:
    n = t.meta[META_LOG]
    t.log[n] = row
    t.meta[META_LOG] = n + 1


@numba.njit(nogil=True, cache=True)
def lookup_or_create(t: TableArrays, p: TableParams, pending: PendingArrays, ids: np.ndarray, counts: np.ndarray,
                     now: np.uint32, version: np.int64) -> tuple[int, np.ndarray]:  # fmt: skip
    """Training lookup: finds each id's row, admitting and creating rows as the filter allows.

    Returns:
        (ids admitted, i.e. rows created; int64 row of each id, -1 for ids the filter
        holds back, which read as zeros).
    """
    rows = np.empty(ids.shape[0], dtype=np.int64)
    admitted = 0
    for i in range(ids.shape[0]):
        key = ids[i]
        row = id_map.find(t, key)
        if row >= 0:
            rows[i] = row
            continue
        occurrences = counts[i]
        admit = True
        if p.filter_kind == FILTER_COUNTING:
            entry = id_map.find(pending, key)
            seen = np.int64(occurrences)
            if entry >= 0:
                seen += pending.count[entry]
            if seen >= p.threshold:
                if entry >= 0:
                    id_map.remove(pending, key)
                    pending.count[entry] = 0
                    id_map.free_row(pending, entry)
            else:
                admit = False
                if entry < 0:
                    entry = id_map.alloc_row(pending)
                    pending.keys[entry] = key
                    id_map.insert(pending, key, entry)
                pending.count[entry] = seen
                pending.time[entry] = now
        elif p.filter_kind == FILTER_PROBABILISTIC:
            # Each occurrence admits independently with probability p, so `occurrences`
            # of them admit with 1 - (1 - p)^occurrences. The draw is keyed by (id, version,
            # position), so an id repeated within one call gets a fresh draw per repeat.
            draw_key = mix64(np.uint64(version) ^ pending.seed) + np.uint64(i)
            u = to_unit_float(mix64(np.uint64(key) ^ mix64(draw_key)))
            admit = u < 1.0 - (1.0 - p.admit_probability) ** occurrences
        if not admit:
            rows[i] = -1
            continue
        row = id_map.alloc_row(t)
        t.keys[row] = key
        id_map.insert(t, key, row)
        init_embedding(t.values, row, key, p)
        init_state(t.values, row, p)
        t.update_time[row] = now
        _log_change(t, row)
        rows[i] = row
        admitted += 1
    return admitted, rows


@numba.njit(nogil=True, cache=True)
def apply_gradients(t: TableArrays, p: TableParams, ids: np.ndarray, grads: np.ndarray, squares: np.ndarray,
                    now: np.uint32) -> int:  # fmt: skip
    """Applies one gradient per id (ids unique); returns how many ids had no row.

    `squares` is [ids, dim] per-occurrence squared-gradient sums (see row_math.apply_gradient),
    or [0, dim]: accumulate the square of each gradient.
    """
    missing = 0
    for i in range(ids.shape[0]):
        row = id_map.find(t, ids[i])
        if row < 0:
            missing += 1
            continue
        apply_gradient(t.values, row, grads, squares, i, p)
        t.update_time[row] = now
        _log_change(t, row)
    return missing


@numba.njit(nogil=True, cache=True)
def sum_duplicates(inverse: np.ndarray, grads: np.ndarray, num_unique: int) -> np.ndarray:
    """Sums gradient rows that share an id (inverse from np.unique)."""
    out = np.zeros((num_unique, grads.shape[1]), dtype=np.float32)
    for i in range(inverse.shape[0]):
        for j in range(grads.shape[1]):
            out[inverse[i], j] += grads[i, j]
    return out


@numba.njit(nogil=True, cache=True)
def sum_duplicates_and_squares(inverse: np.ndarray, grads: np.ndarray, num_unique: int) -> tuple[np.ndarray, np.ndarray]:
    """Per id, the sum of its gradient rows and the sum of their squares (inverse from np.unique).

    The squares are what Adagrad and FTRL accumulate when one step applies an id's summed
    gradient: as much as one step per occurrence would have.
    """
    sums = np.zeros((num_unique, grads.shape[1]), dtype=np.float32)
    squares = np.zeros((num_unique, grads.shape[1]), dtype=np.float32)
    for i in range(inverse.shape[0]):
        for j in range(grads.shape[1]):
            g = grads[i, j]
            sums[inverse[i], j] += g
            squares[inverse[i], j] += g * g
    return sums, squares


@numba.njit(nogil=True, cache=True)
def upsert_rows(t: TableArrays, p: TableParams, ids: np.ndarray, rows_in: np.ndarray, times: np.ndarray) -> None:
    """Writes imported rows: the given columns overwrite, the rest keep (or get fresh) state.

    `rows_in` holds either embeddings only or embeddings plus optimizer state; a new row
    imported without state gets its optimizer's initial state. Update times above
    NEWEST_TIME are clamped (FREE would mark the row free).
    """
    width_in = rows_in.shape[1]
    for i in range(ids.shape[0]):
        key = ids[i]
        row = id_map.find(t, key)
        fresh = row < 0
        if fresh:
            row = id_map.alloc_row(t)
            t.keys[row] = key
            id_map.insert(t, key, row)
        for j in range(width_in):
            t.values[row, j] = rows_in[i, j]
        if fresh and width_in < t.values.shape[1]:
            init_state(t.values, row, p)
        t.update_time[row] = min(times[i], np.uint32(NEWEST_TIME))
        _log_change(t, row)


@numba.njit(inline="always", nogil=True, cache=True)
def _free(t: TableArrays, row: np.int64) -> None:
    """Marks a row (already removed from the index) free."""
    t.update_time[row] = FREE
    id_map.free_row(t, row)


@numba.njit(nogil=True, cache=True)
def delete_ids(t: TableArrays, ids: np.ndarray) -> int:
    """Deletes the rows of ids that have one; returns how many were deleted."""
    count = 0
    for i in range(ids.shape[0]):
        row = id_map.remove(t, ids[i])
        if row >= 0:
            _free(t, row)
            count += 1
    return count


# ------------------------------------------------------------------ expiry


@numba.njit(nogil=True, cache=True)
def first_expired(t: TableArrays, pending: PendingArrays, cutoff: np.uint32, start: int, stop: int) -> int:
    """The first position in [start, stop) holding a row or pending entry last updated
    before `cutoff` (free rows never are: FREE is the largest uint32); `stop` if none."""
    high = t.meta[id_map.META_HIGH]
    p_high = pending.meta[id_map.META_HIGH]
    for position in range(start, stop):
        if position < high and t.update_time[position] < cutoff:
            return position
        if position < p_high and pending.count[position] > 0 and pending.time[position] < cutoff:
            return position
    return stop


@numba.njit(nogil=True, cache=True)
def expire_window(t: TableArrays, pending: PendingArrays, cutoff: np.uint32, start: int, max_rows: int,
                  evicted: np.ndarray) -> tuple[int, int]:  # fmt: skip
    """Frees rows and forgets pending counts last updated before `cutoff`, from `start`.

    Scans at most `max_rows` positions (row numbers of the arena and of the pending map
    alike) and stops early when `evicted` (the ids of freed rows) is full, so one call
    holds the table's write lock for a bounded time.

    Returns:
        (rows freed, the position to continue from; -1 when the scan reached the end).
    """
    high = t.meta[id_map.META_HIGH]
    p_high = pending.meta[id_map.META_HIGH]
    stop = min(max(high, p_high), start + max_rows)
    count = 0
    position = start
    while position < stop and count < evicted.shape[0]:
        if position < high and t.update_time[position] < cutoff:
            key = t.keys[position]
            id_map.remove(t, key)
            _free(t, position)
            evicted[count] = key
            count += 1
        if position < p_high and pending.count[position] > 0 and pending.time[position] < cutoff:
            id_map.remove(pending, pending.keys[position])
            pending.count[position] = 0
            id_map.free_row(pending, position)
        position += 1
    return count, (position if position < max(high, p_high) else -1)


# ------------------------------------------------------------------ export


@numba.njit(nogil=True, cache=True)
def live_rows(t: TableArrays, start: int, stop: int) -> np.ndarray:
    """Live rows in [start, stop), in row order."""
    out = np.empty(max(0, stop - start), dtype=np.int64)
    count = 0
    for row in range(start, stop):
        if t.update_time[row] != FREE:
            out[count] = row
            count += 1
    return out[:count]


@numba.njit(nogil=True, cache=True)
def changed_rows(t: TableArrays, start: int, stop: int) -> np.ndarray:
    """The distinct live rows of log[start:stop], in order of first appearance.

    O(stop - start): duplicates are found with a small hash set of row numbers, or, when
    the range is a large part of the arena, with one byte per row.
    """
    n = max(0, stop - start)
    out = np.empty(n, dtype=np.int64)
    count = 0
    high = t.meta[id_map.META_HIGH]
    if n * 32 >= high:
        seen = np.zeros(high, dtype=np.uint8)
        for i in range(start, stop):
            row = t.log[i]
            if seen[row] == 0 and t.update_time[row] != FREE:
                seen[row] = 1
                out[count] = row
                count += 1
        return out[:count]
    capacity = 16
    while capacity < 2 * n:
        capacity *= 2
    mask = np.uint64(capacity - 1)
    slots = np.full(capacity, -1, dtype=np.int64)
    for i in range(start, stop):
        row = np.int64(t.log[i])
        if t.update_time[row] == FREE:
            continue
        slot = hash_id(row, t.seed) & mask
        while slots[slot] >= 0 and slots[slot] != row:
            slot = (slot + np.uint64(1)) & mask
        if slots[slot] < 0:
            slots[slot] = row
            out[count] = row
            count += 1
    return out[:count]


@numba.njit(nogil=True, cache=True)
def compact_log(t: TableArrays, positions: np.ndarray) -> None:
    """Keeps only the last entry of each live row in the change log, in order.

    `positions` (ascending log positions, e.g. of export marks) are remapped in place to
    the number of kept entries before them, so "everything at or after position p" keeps
    meaning the same changes. Works backwards in place: a kept entry moves to a position
    at or after the one just read.
    """
    n = t.meta[META_LOG]
    seen = np.zeros(t.meta[id_map.META_HIGH], dtype=np.uint8)
    kept_after = np.zeros(positions.shape[0], dtype=np.int64)
    kept = 0
    write = n
    p = positions.shape[0] - 1
    for i in range(n - 1, -1, -1):
        while p >= 0 and positions[p] > i:
            kept_after[p] = kept
            p -= 1
        row = t.log[i]
        if seen[row] == 0 and t.update_time[row] != FREE:
            seen[row] = 1
            write -= 1
            t.log[write] = row
            kept += 1
    while p >= 0:
        kept_after[p] = kept
        p -= 1
    for j in range(kept):
        t.log[j] = t.log[write + j]
    for q in range(positions.shape[0]):
        positions[q] = kept - kept_after[q]
    t.meta[META_LOG] = kept
