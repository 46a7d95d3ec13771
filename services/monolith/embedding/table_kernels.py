"""Batched numba kernels over one slot's arrays; they release the GIL.

The kernels never allocate table memory: the caller (`EmbeddingTable`) grows the arrays
first, for the worst case of the batch, so that a kernel can always take a new row.
A row is free when `version[row] == -1`.
"""

from __future__ import annotations

import numba
import numpy as np

from monolith.embedding import id_map
from monolith.embedding.hashing import mix64, to_unit_float
from monolith.embedding.row_math import apply_gradient, init_embedding, init_state

FILTER_NONE, FILTER_COUNTING, FILTER_PROBABILISTIC = 0, 1, 2
FILTER_CODES = {"none": FILTER_NONE, "counting": FILTER_COUNTING, "probabilistic": FILTER_PROBABILISTIC}


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
def lookup_into(index: np.ndarray, keys: np.ndarray, values: np.ndarray, seed: np.uint64, ids: np.ndarray,
                out: np.ndarray) -> int:  # fmt: skip
    """out[i] = embedding of ids[i], zeros if it has no row; returns the number of misses.

    One call instead of find + gather: each numba call checks the types of its arguments,
    which costs as much as looking up a few hundred ids.
    """
    rows = np.empty(ids.shape[0], dtype=np.int64)
    misses = id_map.find_many(index, keys, seed, ids, rows)
    gather(values, rows, out)
    return misses


@numba.njit(nogil=True, cache=True)
def lookup_or_create(
    index, keys, meta, values, version, update_time, seed, dim,
    init_kind, init_scale, slot_seed, opt_kind, hp,
    filter_kind, threshold, admit_probability,
    p_index, p_keys, p_meta, p_count, p_time, p_seed,
    ids, counts, now, new_version, rows,
):  # fmt: skip
    """Training lookup: finds each id's row, admitting and creating rows as the filter allows.

    Ids the filter holds back get rows[i] = -1 (they read as zeros). Returns the number
    of ids admitted (rows created).
    """
    admitted = 0
    for i in range(ids.shape[0]):
        key = ids[i]
        row = id_map.find(index, keys, seed, key)
        if row >= 0:
            rows[i] = row
            continue
        occurrences = counts[i]
        admit = True
        if filter_kind == FILTER_COUNTING:
            pending = id_map.find(p_index, p_keys, p_seed, key)
            seen = np.int64(occurrences)
            if pending >= 0:
                seen += p_count[pending]
            if seen >= threshold:
                if pending >= 0:
                    id_map.remove(p_index, p_keys, p_seed, key)
                    p_count[pending] = 0
                    id_map.free_row(p_meta, p_keys, pending)
            else:
                admit = False
                if pending < 0:
                    pending = id_map.alloc_row(p_meta, p_keys)
                    p_keys[pending] = key
                    id_map.insert(p_index, p_keys, p_seed, key, pending)
                p_count[pending] = seen
                p_time[pending] = now
        elif filter_kind == FILTER_PROBABILISTIC:
            # Each occurrence admits independently with probability p, so `occurrences`
            # of them admit with 1 - (1 - p)^occurrences. The draw is keyed by (id, version,
            # position), so an id repeated within one call gets a fresh draw per repeat.
            draw_key = mix64(np.uint64(new_version) ^ p_seed) + np.uint64(i)
            u = to_unit_float(mix64(np.uint64(key) ^ mix64(draw_key)))
            admit = u < 1.0 - (1.0 - admit_probability) ** occurrences
        if not admit:
            rows[i] = -1
            continue
        row = id_map.alloc_row(meta, keys)
        keys[row] = key
        id_map.insert(index, keys, seed, key, row)
        init_embedding(values, row, dim, key, init_kind, init_scale, slot_seed)
        init_state(values, row, dim, opt_kind, hp)
        version[row] = new_version
        update_time[row] = now
        rows[i] = row
        admitted += 1
    return admitted


@numba.njit(nogil=True, cache=True)
def apply_gradients(index, keys, values, version, update_time, seed, opt_kind, hp, ids, grads, now, new_version):
    """Applies one gradient per id (ids unique); returns how many ids had no row."""
    dim = grads.shape[1]
    missing = 0
    for i in range(ids.shape[0]):
        row = id_map.find(index, keys, seed, ids[i])
        if row < 0:
            missing += 1
            continue
        apply_gradient(values, row, grads, i, dim, opt_kind, hp)
        version[row] = new_version
        update_time[row] = now
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
def expire_rows(index, keys, meta, version, update_time, seed, cutoff, evicted):
    """Frees every live row last updated before `cutoff`; writes their ids to `evicted`.

    Returns the number of rows evicted.
    """
    count = 0
    for row in range(meta[id_map.META_HIGH]):
        if version[row] >= 0 and update_time[row] < cutoff:
            key = keys[row]
            id_map.remove(index, keys, seed, key)
            version[row] = -1
            id_map.free_row(meta, keys, row)
            evicted[count] = key
            count += 1
    return count


@numba.njit(nogil=True, cache=True)
def expire_pending(p_index, p_keys, p_meta, p_count, p_time, p_seed, cutoff):
    """Forgets occurrence counts of ids not seen since `cutoff`; returns how many."""
    count = 0
    for row in range(p_meta[id_map.META_HIGH]):
        if p_count[row] > 0 and p_time[row] < cutoff:
            id_map.remove(p_index, p_keys, p_seed, p_keys[row])
            p_count[row] = 0
            id_map.free_row(p_meta, p_keys, row)
            count += 1
    return count


@numba.njit(nogil=True, cache=True)
def changed_rows(version: np.ndarray, start: int, stop: int, since: np.int64) -> np.ndarray:
    """Rows in [start, stop) that are live and changed after version `since`."""
    out = np.empty(stop - start, dtype=np.int64)
    count = 0
    for row in range(start, stop):
        if version[row] > since:
            out[count] = row
            count += 1
    return out[:count]


@numba.njit(nogil=True, cache=True)
def upsert_rows(index, keys, meta, values, version, update_time, seed, dim, opt_kind, hp, ids, rows_in, times, new_version):
    """Writes imported rows: the given columns overwrite, the rest keep (or get fresh) state.

    `rows_in` holds either embeddings only or embeddings plus optimizer state; a new row
    imported without state gets its optimizer's initial state.
    """
    width_in = rows_in.shape[1]
    for i in range(ids.shape[0]):
        key = ids[i]
        row = id_map.find(index, keys, seed, key)
        fresh = row < 0
        if fresh:
            row = id_map.alloc_row(meta, keys)
            keys[row] = key
            id_map.insert(index, keys, seed, key, row)
        for j in range(width_in):
            values[row, j] = rows_in[i, j]
        if fresh and width_in < values.shape[1]:
            init_state(values, row, dim, opt_kind, hp)
        version[row] = new_version
        update_time[row] = times[i]


@numba.njit(nogil=True, cache=True)
def delete_ids(index, keys, meta, version, seed, ids):
    """Deletes the rows of ids that have one; returns how many were deleted."""
    count = 0
    for i in range(ids.shape[0]):
        row = id_map.remove(index, keys, seed, ids[i])
        if row >= 0:
            version[row] = -1
            id_map.free_row(meta, keys, row)
            count += 1
    return count
