"""Rows of many tables by id, held within a byte budget, evicting by CLOCK. No gRPC, no locks.

The store behind model-serving's embedding cache (`embedding_cache`): it only holds rows;
what keeps them coherent with the serving shards, and the locking, is the cache's.

Each table has its own store, a named tuple of numpy arrays (`CacheArrays`) that the
numba kernels take whole: the project's collisionless id map (`embedding.id_map`: a
seeded linear-probing index, exact deletion, an intrusive free list) from id to row, and
per row its embedding, its CLOCK state and the serving shard it came from. Lookups,
inserts, deletions and drops are one kernel call per table, with no Python per id.

Bytes. A store's bytes are its arrays' bytes (`footprint`): per row the id (8), the
embedding (4 x dim), the state (1) and the shard (2), plus 4 per index slot (the index is
a power of two at most 70% full). Stores start empty and grow (doubling) as rows arrive,
while the stores' total stays within the budget; a table whose store cannot grow evicts
its own rows. The budget is thus shared first come, first served (past MIN_ROWS rows,
which every table can always have): a small table never reserves memory it does not
use, and a table that filled early keeps what it took.
Growing copies the store, so for that instant it is held twice.

Eviction is CLOCK (second chance), an approximation of LRU that costs a byte store per
hit: a row enters cold; a hit makes it hot; to make room the hand sweeps the rows,
cooling hot ones and evicting the first cold one. A burst of ids seen once (a scan)
therefore evicts itself before it evicts rows that are hit again.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numba
import numpy as np

from monolith.embedding import id_map
from monolith.embedding.id_map import META_FREE_HEAD, META_HIGH, META_LIVE

# A row's CLOCK state; FREE rows are on the id map's free list (or were never used).
FREE = np.uint8(0)
COLD = np.uint8(1)
HOT = np.uint8(2)

META_HAND = id_map.META_SIZE  # the CLOCK hand: the next row the sweep looks at
META_EVICTIONS = id_map.META_SIZE + 1  # rows evicted since the store was made
_META_SIZE = id_map.META_SIZE + 2

MIN_ROWS = 64  # a store's first capacity; the budget must let every table hold this many
MAX_SHARDS = 1 << 16  # a row's shard is a uint16


class CacheArrays(NamedTuple):
    """One table's store, as the kernels see it.

    Attributes:
        index: int32 [power of two]: the id map's slots (see `id_map`).
        keys: int64 [capacity]: each row's id (the free list for free rows).
        meta: int64 [_META_SIZE]: live rows, high-water mark, free-list head, CLOCK hand,
            evictions.
        seed: uint64: the index's hash seed.
        values: float32 [capacity, dim]: the embeddings.
        state: uint8 [capacity]: FREE, COLD or HOT.
        owner: uint16 [capacity]: the serving shard each row came from.
    """

    index: np.ndarray
    keys: np.ndarray
    meta: np.ndarray
    seed: np.uint64
    values: np.ndarray
    state: np.ndarray
    owner: np.ndarray


def _index_slots(capacity: int) -> int:
    """The index size for `capacity` rows: a power of two at most 70% full (id_map.MAX_LOAD)."""
    slots = 8
    while slots * id_map.MAX_LOAD < capacity:
        slots *= 2
    return slots


def footprint(capacity: int, dim: int) -> int:
    """Bytes of a table's store with room for `capacity` rows of `dim` floats."""
    return 4 * _index_slots(capacity) + capacity * (8 + 4 * dim + 1 + 2) + 8 * _META_SIZE


def _new_store(capacity: int, dim: int, seed: np.uint64) -> CacheArrays:
    meta = id_map.new_meta(_META_SIZE)
    return CacheArrays(
        index=np.full(_index_slots(capacity), id_map.EMPTY, dtype=np.int32),
        keys=np.zeros(capacity, dtype=np.int64),
        meta=meta,
        seed=seed,
        values=np.zeros((capacity, dim), dtype=np.float32),
        state=np.zeros(capacity, dtype=np.uint8),
        owner=np.zeros(capacity, dtype=np.uint16),
    )


def _nbytes(store: CacheArrays) -> int:
    return store.index.nbytes + store.keys.nbytes + store.meta.nbytes + store.values.nbytes + \
        store.state.nbytes + store.owner.nbytes  # fmt: skip


class RowCache:
    """Rows of every table by id, in at most `budget` bytes of arrays.

    Not thread-safe: `get` may run concurrently with other `get`s (it only sets CLOCK
    bits), everything else needs the caller's exclusive lock.

    Args:
        dims: each table's embedding dimension.
        budget: bytes all stores may take together.
        num_shards: serving shards rows come from (each row remembers its own).

    Raises:
        ValueError: the budget cannot hold MIN_ROWS rows of every table, or too many shards.
    """

    def __init__(self, dims: Mapping[str, int], budget: int, num_shards: int) -> None:
        if not 1 <= num_shards <= MAX_SHARDS:
            raise ValueError(f"num_shards must be in 1..{MAX_SHARDS}, got {num_shards}")
        least = self.least_budget(dims)
        if budget < least:
            raise ValueError(
                f"a budget of {budget} bytes cannot hold {MIN_ROWS} rows of each of the {len(dims)} tables; "
                f"give at least {least} bytes"
            )
        self.budget = budget
        self.num_shards = num_shards
        self._dims = dict(dims)
        rng = np.random.default_rng()  # seeded per store, as the tables' own indexes are
        self._stores = {name: _new_store(0, dim, np.uint64(rng.integers(2**63))) for name, dim in dims.items()}
        self._bytes = sum(_nbytes(s) for s in self._stores.values())

    @staticmethod
    def least_budget(dims: Mapping[str, int]) -> int:
        """The smallest budget that holds MIN_ROWS rows of every table."""
        return sum(footprint(MIN_ROWS, dim) for dim in dims.values())

    @property
    def bytes(self) -> int:
        """Bytes the stores' arrays take (at most `budget`)."""
        return self._bytes

    @property
    def rows(self) -> int:
        """Rows held, over every table."""
        return sum(int(s.meta[META_LIVE]) for s in self._stores.values())

    @property
    def evictions(self) -> int:
        """Rows evicted to make room, since the cache was made."""
        return sum(int(s.meta[META_EVICTIONS]) for s in self._stores.values())

    def table_rows(self, name: str) -> int:
        """Rows held of one table."""
        return int(self._stores[name].meta[META_LIVE])

    def owned_rows(self, owner: int) -> int:
        """Rows held that came from one shard (a scan: for tests and logs)."""
        return sum(int(np.count_nonzero((s.state != FREE) & (s.owner == owner))) for s in self._stores.values())

    def get(self, name: str, ids: np.ndarray, usable: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Writes the held rows of `ids` into `out` and marks them recently used.

        Args:
            name: the table.
            ids: int64 [n].
            usable: bool [num_shards]: rows from a shard whose flag is False count as missing.
            out: float32 [n, dim]; rows of missing ids are left as they were.

        Returns:
            int64 positions in `ids` of the ids missing (not held, or from an unusable shard).
        """
        missing = np.empty(ids.shape[0], dtype=np.int64)
        count = _get(self._stores[name], ids, usable, out, missing)
        return missing[:count]

    def put(self, name: str, ids: np.ndarray, rows: np.ndarray, owners: np.ndarray, allowed: np.ndarray,
            evict: bool) -> tuple[int, int]:  # fmt: skip
        """Stores rows: those held are overwritten, the others inserted (as cold rows).

        The store grows first if the budget allows. Where it still has no free row, an
        insert evicts a cold row if `evict`, else is skipped; an overwrite is never skipped.

        Args:
            name: the table.
            ids: int64 [n] (repeats allowed: the last row wins).
            rows: float32 [n, dim].
            owners: uint16 [n]: the shard each row came from.
            allowed: bool [num_shards]: rows from a shard whose flag is False are skipped.
            evict: whether inserts may evict.

        Returns:
            (rows stored (overwritten or inserted), rows evicted to make room).
        """
        store = self._stores[name]
        spare = store.keys.shape[0] - int(store.meta[META_LIVE])
        if spare < ids.shape[0]:
            store = self._grow(name, _count_absent(store, ids))
        evictions = int(store.meta[META_EVICTIONS])
        stored = int(_put(store, ids, rows, owners, allowed, evict))
        return stored, int(store.meta[META_EVICTIONS]) - evictions

    def delete(self, name: str, ids: np.ndarray) -> int:
        """Drops the rows of `ids` that are held; returns how many were."""
        return int(_delete(self._stores[name], ids))

    def drop_owner(self, owner: int) -> int:
        """Drops every row that came from one shard; returns how many."""
        return sum(int(_drop_owner(store, np.uint16(owner))) for store in self._stores.values())

    def _grow(self, name: str, absent: int) -> CacheArrays:
        """The table's store, grown (if the budget allows) to hold `absent` more rows."""
        store = self._stores[name]
        dim = self._dims[name]
        capacity = store.keys.shape[0]
        wanted = int(store.meta[META_LIVE]) + absent
        if wanted <= capacity:
            return store
        # Bytes this store may take: the budget less the others', each counted as at least
        # MIN_ROWS rows, so a table that grew first never leaves another without room for a few.
        others = sum(max(_nbytes(s), footprint(MIN_ROWS, self._dims[n])) for n, s in self._stores.items() if n != name)
        room = self.budget - others
        target = max(wanted, 2 * capacity, MIN_ROWS)
        if footprint(target, dim) > room:
            low, high = capacity, target  # the largest capacity that fits: footprint grows with it
            while low < high:
                middle = (low + high + 1) // 2
                if footprint(middle, dim) <= room:
                    low = middle
                else:
                    high = middle - 1
            target = low
        if target <= capacity:
            return store
        grown = _new_store(target, dim, store.seed)
        used = int(store.meta[META_HIGH])
        grown.keys[:used] = store.keys[:used]
        grown.values[:used] = store.values[:used]
        grown.state[:used] = store.state[:used]
        grown.owner[:used] = store.owner[:used]
        grown.meta[:] = store.meta
        id_map.rebuild_index(grown, grown.state[:used] != FREE)
        self._bytes += _nbytes(grown) - _nbytes(store)
        self._stores[name] = grown
        return grown


@numba.njit(nogil=True, cache=True)
def _get(a: CacheArrays, ids: np.ndarray, usable: np.ndarray, out: np.ndarray, missing: np.ndarray) -> int:
    rows = np.empty(ids.shape[0], dtype=np.int64)
    id_map.find_many(a, ids, rows)
    dim = a.values.shape[1]
    count = 0
    for i in range(ids.shape[0]):
        row = rows[i]
        if row >= 0 and usable[a.owner[row]]:
            for j in range(dim):
                out[i, j] = a.values[row, j]
            if a.state[row] != HOT:  # no store when already hot: hits on a hot row dirty no cache line
                a.state[row] = HOT
        else:
            missing[count] = i
            count += 1
    return count


@numba.njit(nogil=True, cache=True)
def _count_absent(a: CacheArrays, ids: np.ndarray) -> int:
    count = 0
    for i in range(ids.shape[0]):
        if id_map.find(a, ids[i]) < 0:
            count += 1
    return count


@numba.njit(nogil=True, cache=True)
def _evict_one(a: CacheArrays) -> np.int64:
    """Frees a cold row for reuse (every row is live when called); hot rows it passes turn cold."""
    meta, state = a.meta, a.state
    capacity = a.keys.shape[0]
    hand = meta[META_HAND]
    while True:
        if hand >= capacity:
            hand = 0
        if state[hand] == COLD:
            break
        state[hand] = COLD
        hand += 1
    meta[META_HAND] = hand + 1
    meta[META_EVICTIONS] += 1
    id_map.remove(a, a.keys[hand])
    return np.int64(hand)


@numba.njit(nogil=True, cache=True)
def _put(a: CacheArrays, ids: np.ndarray, rows: np.ndarray, owners: np.ndarray, allowed: np.ndarray,
         evict: bool) -> int:  # fmt: skip
    meta = a.meta
    capacity = a.keys.shape[0]
    dim = a.values.shape[1]
    stored = 0
    for i in range(ids.shape[0]):
        owner = owners[i]
        if not allowed[owner]:
            continue
        key = ids[i]
        row = id_map.find(a, key)
        if row < 0:
            if meta[META_FREE_HEAD] >= 0 or meta[META_HIGH] < capacity:
                row = id_map.alloc_row(a)
            elif evict and capacity > 0:
                row = _evict_one(a)
            else:
                continue
            a.keys[row] = key
            id_map.insert(a, key, row)
            a.state[row] = COLD
        a.owner[row] = owner
        for j in range(dim):
            a.values[row, j] = rows[i, j]
        stored += 1
    return stored


@numba.njit(nogil=True, cache=True)
def _delete(a: CacheArrays, ids: np.ndarray) -> int:
    deleted = 0
    for i in range(ids.shape[0]):
        row = id_map.remove(a, ids[i])
        if row >= 0:
            a.state[row] = FREE
            id_map.free_row(a, row)
            deleted += 1
    return deleted


@numba.njit(nogil=True, cache=True)
def _drop_owner(a: CacheArrays, owner: np.uint16) -> int:
    dropped = 0
    for row in range(a.meta[META_HIGH]):
        if a.state[row] != FREE and a.owner[row] == owner:
            id_map.remove(a, a.keys[row])
            a.state[row] = FREE
            id_map.free_row(a, np.int64(row))
            dropped += 1
    return dropped
