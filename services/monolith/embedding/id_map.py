"""A collisionless map from int64 ids to row numbers, as numba kernels over numpy arrays.

Why linear probing and not the paper's bucketized cuckoo hash: with linear probing a
lookup is correct whatever the hash function does (a set of ids that all hash alike only
makes probes longer, it can never make two ids share a row or make an insert fail), the
probe sequence walks one cache line, and deletion is exact by backward shifting, with
no tombstones. Cuckoo hashing needs a rehash with new hash functions, or a stash, when
an insert cycles, and adversarial sets can make every rehash cycle. The hash is seeded
per map, so ids cannot be chosen to collide in advance; the index is kept at most 70%
full, where expected probes stay below 2 for hits and about 6 for misses.

A map is a named tuple with (at least) these fields, all plain numpy arrays so growth is
a Python-side reallocation followed by a new tuple:
- `index[slot]`: int32 row number, or -1 for an empty slot; its size is a power of two;
- `keys[row]`: the id owning a row; for a free row, the next free row (an intrusive free
  list, so free rows cost no extra memory);
- `meta`: int64 scalars the kernels update in place (see the META_* constants; a caller
  may append its own scalars after META_SIZE);
- `seed`: the map's uint64 hash seed.
The kernels take the tuple, not its arrays one by one, so two same-typed arrays cannot be
passed in each other's place. Liveness of a row is the caller's business (the table marks
free rows by their update time).
"""

from __future__ import annotations

from typing import Protocol

import numba
import numpy as np

from monolith.embedding.hashing import hash_id

META_LIVE = 0  # rows in use
META_HIGH = 1  # rows ever handed out (high-water mark); rows >= HIGH were never used
META_FREE_HEAD = 2  # first free row below HIGH, or -1
META_SIZE = 3

MAX_LOAD = 0.7
EMPTY = np.int32(-1)


class MapArrays(Protocol):
    """What the kernels read of a map: any named tuple with these fields."""

    @property
    def index(self) -> np.ndarray: ...
    @property
    def keys(self) -> np.ndarray: ...
    @property
    def meta(self) -> np.ndarray: ...
    @property
    def seed(self) -> np.uint64: ...


def new_meta(size: int = META_SIZE) -> np.ndarray:
    """Fresh meta scalars: no rows, empty free list (and `size - META_SIZE` caller zeros)."""
    meta = np.zeros(size, dtype=np.int64)
    meta[META_FREE_HEAD] = -1
    return meta


def index_capacity_for(rows: int) -> int:
    """The smallest power-of-two index size holding `rows` at about half load."""
    capacity = 8
    while capacity * 0.5 < rows:
        capacity *= 2
    return capacity


@numba.njit(inline="always", nogil=True, cache=True)
def find(m: MapArrays, key: np.int64) -> np.int64:
    """Row of `key` in map `m`, or -1."""
    index, keys, seed = m.index, m.keys, m.seed
    mask = np.uint64(index.shape[0] - 1)
    slot = hash_id(key, seed) & mask
    while True:
        row = index[slot]
        if row < 0:
            return -1
        if keys[row] == key:
            return np.int64(row)
        slot = (slot + np.uint64(1)) & mask


@numba.njit(inline="always", nogil=True, cache=True)
def insert(m: MapArrays, key: np.int64, row: np.int64) -> None:
    """Puts `row` (whose keys[row] == key) into the index; key must be absent."""
    index, seed = m.index, m.seed
    mask = np.uint64(index.shape[0] - 1)
    slot = hash_id(key, seed) & mask
    while index[slot] >= 0:
        slot = (slot + np.uint64(1)) & mask
    index[slot] = row


@numba.njit(inline="always", nogil=True, cache=True)
def remove(m: MapArrays, key: np.int64) -> np.int64:
    """Removes `key` from the index by backward-shift deletion; returns its row or -1."""
    index, keys, seed = m.index, m.keys, m.seed
    mask = np.uint64(index.shape[0] - 1)
    hole = hash_id(key, seed) & mask
    while True:
        row = index[hole]
        if row < 0:
            return -1
        if keys[row] == key:
            break
        hole = (hole + np.uint64(1)) & mask
    found = np.int64(row)
    probe = hole
    while True:
        probe = (probe + np.uint64(1)) & mask
        row = index[probe]
        if row < 0:
            break
        home = hash_id(keys[row], seed) & mask
        # The entry at `probe` may move back into the hole only if its home slot is not
        # cyclically within (hole, probe]; otherwise moving it would hide it from find().
        if hole <= probe:
            stays = hole < home <= probe
        else:
            stays = home > hole or home <= probe
        if not stays:
            index[hole] = row
            hole = probe
    index[hole] = EMPTY
    return found


@numba.njit(inline="always", nogil=True, cache=True)
def alloc_row(m: MapArrays) -> np.int64:
    """Takes a row from the free list, else the next never-used row (capacity checked by caller)."""
    meta, keys = m.meta, m.keys
    head = meta[META_FREE_HEAD]
    if head >= 0:
        meta[META_FREE_HEAD] = keys[head]
        row = head
    else:
        row = meta[META_HIGH]
        meta[META_HIGH] = row + 1
    meta[META_LIVE] += 1
    return row


@numba.njit(inline="always", nogil=True, cache=True)
def free_row(m: MapArrays, row: np.int64) -> None:
    """Returns a row (already removed from the index) to the free list."""
    meta, keys = m.meta, m.keys
    keys[row] = meta[META_FREE_HEAD]
    meta[META_FREE_HEAD] = row
    meta[META_LIVE] -= 1


@numba.njit(nogil=True, cache=True)
def rebuild_index(m: MapArrays, alive: np.ndarray) -> None:
    """Fills the map's (new, empty) index with every row whose `alive` flag is set."""
    m.index[:] = EMPTY
    for row in range(alive.shape[0]):
        if alive[row]:
            insert(m, m.keys[row], np.int64(row))


@numba.njit(nogil=True, cache=True)
def find_many(m: MapArrays, ids: np.ndarray, rows: np.ndarray) -> int:
    """rows[i] = row of ids[i] or -1; returns the number of misses.

    Done in two passes so the cache misses of different ids overlap: the first pass only
    reads each id's home slot (independent loads the CPU issues back to back), the second
    checks the key and walks the probe sequence where the home slot was not a hit. On a
    table much larger than the cache this is ~1.3x faster than probing id by id.
    """
    index, keys, seed = m.index, m.keys, m.seed
    mask = np.uint64(index.shape[0] - 1)
    for i in range(ids.shape[0]):
        rows[i] = index[hash_id(ids[i], seed) & mask]
    misses = 0
    for i in range(ids.shape[0]):
        row = rows[i]
        if row < 0 or keys[row] != ids[i]:
            rows[i] = find(m, ids[i]) if row >= 0 else -1
            if rows[i] < 0:
                misses += 1
    return misses
