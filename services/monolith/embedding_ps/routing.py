"""Which shard owns an id, one batch's ids deduped and grouped by owner, and the rows back in order.

An id of a table lives on shard `hash(table, id) % num_shards`. The sharded client routes
with this, every shard checks it, and the in-process reference backend dedupes through the
same kernel, so local and remote training see the same unique ids and counts.
"""

from __future__ import annotations

import numba
import numpy as np

from monolith.embedding.hashing import hash_id


def route_to_shards(ids: np.ndarray, table_salt: int, num_shards: int) -> np.ndarray:
    """Shard index of each id of a table: a stable hash of (table, id) modulo num_shards.

    Args:
        ids: int64 ids.
        table_salt: `stable_hash64(table_name)`.
        num_shards: number of shards (>= 1).

    Returns:
        int64 shard index per id.
    """
    return _route(np.ascontiguousarray(ids, dtype=np.int64), np.uint64(table_salt), np.uint64(num_shards))


@numba.njit(nogil=True, cache=True)
def _route(ids: np.ndarray, salt: np.uint64, num_shards: np.uint64) -> np.ndarray:
    out = np.empty(ids.shape[0], dtype=np.int64)
    for i in range(ids.shape[0]):
        out[i] = np.int64(hash_id(ids[i], salt) % num_shards)
    return out


def dedupe_and_route(ids: np.ndarray, salt: np.uint64, num_shards: np.uint64):  # type: ignore[no-untyped-def]
    """Unique ids of one table's batch, grouped by owning shard, in linear time.

    `dedupe_and_route_tables` for a single table: with a dim of 1, where each id's row
    starts in the answers is its position among the unique ids.

    Returns:
        unique: int64 [u] distinct ids, grouped by shard (first-seen order within a shard);
        inverse: int64 [n], position in `unique` of each input id;
        counts: int32 [u], occurrences of each unique id;
        bounds: int64 [num_shards + 1], shard s owns unique[bounds[s]:bounds[s + 1]].
    """
    flat = np.ascontiguousarray(ids, dtype=np.int64)
    offsets = np.array([0, flat.shape[0]], dtype=np.int64)
    salts = np.array([salt], dtype=np.uint64)
    unique, counts, bounds, inverse = dedupe_and_route_tables(flat, offsets, salts, _ONE_DIM, np.uint64(num_shards))
    return unique, inverse, counts, bounds


_ONE_DIM = np.ones(1, dtype=np.int64)


@numba.njit(nogil=True, cache=True)
def dedupe_and_route_tables(  # type: ignore[no-untyped-def]
    ids: np.ndarray, offsets: np.ndarray, salts: np.ndarray, dims: np.ndarray, num_shards: np.uint64
):
    """`dedupe_and_route` for many tables' ids at once, in one call.

    A lookup of a dozen small tables spent more on a dozen kernel calls and the numpy
    around each than on the ids themselves; here one call does them all.

    Args:
        ids: int64, every table's ids concatenated; table t's are ids[offsets[t]:offsets[t + 1]].
        offsets: int64 [T + 1].
        salts: uint64 [T], `stable_hash64` of each table's name.
        dims: int64 [T], each table's embedding dimension.
        num_shards: number of shards.

    Returns:
        unique: int64 [u] distinct ids per table, in blocks b = shard * T + table: block b
            is unique[bounds[b]:bounds[b + 1]] (first-seen order within a block), so one
            shard's ids are contiguous, table by table;
        counts: int32 [u], occurrences of each unique id;
        bounds: int64 [num_shards * T + 1];
        source: int64 [n], for each input id, where its row starts (in floats) in the
            shards' answers concatenated block by block (see `unpack_rows`).
    """
    n = ids.shape[0]
    tables = salts.shape[0]
    shards = np.int64(num_shards)
    first_seen = np.empty(n, dtype=np.int64)
    seen_counts = np.zeros(n, dtype=np.int32)
    block_of = np.empty(n, dtype=np.int64)  # block of each unique number
    order = np.empty(n, dtype=np.int64)  # unique number of each input
    u = 0
    for t in range(tables):
        start, end = offsets[t], offsets[t + 1]
        capacity = 16
        while capacity < 2 * (end - start):
            capacity *= 2
        mask = np.uint64(capacity - 1)
        index = np.full(capacity, -1, dtype=np.int64)
        salt = salts[t]
        for i in range(start, end):
            key = ids[i]
            h = hash_id(key, salt)
            slot = h & mask
            while True:
                k = index[slot]
                if k < 0:
                    index[slot] = u
                    first_seen[u] = key
                    block_of[u] = np.int64(h % num_shards) * tables + t
                    k = u
                    u += 1
                    break
                if first_seen[k] == key:
                    break
                slot = (slot + np.uint64(1)) & mask
            seen_counts[k] += 1
            order[i] = k
    blocks = shards * tables
    bounds = np.zeros(blocks + 1, dtype=np.int64)
    for k in range(u):
        bounds[block_of[k] + 1] += 1
    for b in range(blocks):
        bounds[b + 1] += bounds[b]
    fill = bounds[:-1].copy()
    position = np.empty(u, dtype=np.int64)
    unique = np.empty(u, dtype=np.int64)
    counts = np.empty(u, dtype=np.int32)
    for k in range(u):
        p = fill[block_of[k]]
        fill[block_of[k]] += 1
        position[k] = p
        unique[p] = first_seen[k]
        counts[p] = seen_counts[k]
    float_start = np.zeros(blocks + 1, dtype=np.int64)
    for b in range(blocks):
        float_start[b + 1] = float_start[b] + (bounds[b + 1] - bounds[b]) * dims[b % tables]
    source = np.empty(n, dtype=np.int64)
    for t in range(tables):
        for i in range(offsets[t], offsets[t + 1]):
            k = order[i]
            b = block_of[k]
            source[i] = float_start[b] + (position[k] - bounds[b]) * dims[t]
    return unique, counts, bounds, source


@numba.njit(nogil=True, cache=True)
def unpack_rows(values: np.ndarray, source: np.ndarray, offsets: np.ndarray, dims: np.ndarray,
                out: np.ndarray) -> None:  # fmt: skip
    """Rows of the shards' answers back in input order, every table in one call.

    Args:
        values: float32, the answers' rows concatenated block by block.
        source: from `dedupe_and_route_tables`: where each input id's row starts in `values`.
        offsets: int64 [T + 1], as passed to `dedupe_and_route_tables`.
        dims: int64 [T].
        out: float32 [sum of n_t * dim_t]: table t's [n_t, dim_t] rows, table after table.
    """
    o = 0
    for t in range(dims.shape[0]):
        dim = dims[t]
        for i in range(offsets[t], offsets[t + 1]):
            s = source[i]
            for j in range(dim):
                out[o + j] = values[s + j]
            o += dim
