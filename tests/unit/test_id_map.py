"""The id → row map behind every table: no two ids ever share a row, whatever the ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from monolith.embedding import id_map
from monolith.embedding.config import AdmissionConfig, InitializerConfig, OptimizerConfig, TableConfig
from monolith.embedding.hashing import hash_id
from monolith.embedding.table import EmbeddingTable

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DIM = 4

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def hashes(ids: np.ndarray, seed: np.uint64) -> np.ndarray:
    """Vectorised `hash_id`, to search for colliding ids quickly."""
    x = np.asarray(ids, dtype=np.int64).view(np.uint64) ^ np.uint64(seed)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def sgd_table(initial_capacity: int = 1024, name: str = "ids") -> EmbeddingTable:
    # SGD with lr 1 makes a row's value after a gradient g exactly `initial - g`.
    return EmbeddingTable(
        TableConfig(
            name=name,
            dim=DIM,
            initializer=InitializerConfig(kind="uniform", scale=0.5),
            optimizer=OptimizerConfig(kind="sgd", learning_rate=1.0),
            admission=AdmissionConfig(filter="none"),
        ),
        initial_capacity=initial_capacity,
    )


def markers(n: int) -> np.ndarray:
    """A distinct gradient per position, so a shared row would show two ids' updates."""
    return -np.repeat(np.arange(1, n + 1, dtype=np.float32)[:, None], DIM, axis=1)


def test_vectorised_hash_matches_the_kernel() -> None:
    seed = np.uint64(0x1234_5678_9ABC_DEF0)
    ids = np.array([0, 1, -1, INT64_MIN, INT64_MAX, 987654321987], dtype=np.int64)

    expected = [hash_id(np.int64(i), seed) for i in ids]

    assert hashes(ids, seed).tolist() == [int(h) for h in expected]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(st.integers(INT64_MIN, INT64_MAX), unique=True, max_size=300),
    others=st.lists(st.integers(INT64_MIN, INT64_MAX), max_size=50),
    batch=st.integers(1, 64),
)
@example(ids=[INT64_MIN, INT64_MAX, 0, -1, 1], others=[2, -2, INT64_MIN + 1, INT64_MAX - 1], batch=2)
@example(ids=[], others=[0, INT64_MIN], batch=1)
def test_every_distinct_id_gets_its_own_row(ids: list[int], others: list[int], batch: int) -> None:
    ids_array = np.array(ids, dtype=np.int64)
    table = sgd_table(initial_capacity=8)
    created = np.zeros((len(ids), DIM), dtype=np.float32)
    for start in range(0, len(ids), batch):
        created[start : start + batch] = table.lookup_train(ids_array[start : start + batch], None, 10.0, 1)
    # Another table (its own random index seed) filled in the opposite order: same vectors.
    reference = sgd_table(initial_capacity=8)
    expected = reference.lookup_train(ids_array[::-1], None, 10.0, 1)[::-1]

    assert len(table) == len(ids)
    np.testing.assert_array_equal(created, expected)
    np.testing.assert_array_equal(table.lookup(ids_array), expected)
    assert table.contains(ids_array).all()
    absent = np.array([i for i in others if i not in set(ids)], dtype=np.int64)
    assert not table.contains(absent).any()
    np.testing.assert_array_equal(table.lookup(absent), np.zeros((absent.shape[0], DIM), np.float32))

    # A second training lookup creates nothing and returns the same rows.
    np.testing.assert_array_equal(table.lookup_train(ids_array, None, 11.0, 2), expected)
    assert len(table) == len(ids)

    # One distinct update per id: a row shared by two ids would carry both.
    table.apply_gradients(ids_array, markers(len(ids)), 12.0, 3)
    np.testing.assert_array_equal(table.lookup(ids_array), expected - markers(len(ids)))


def test_duplicates_within_a_batch_share_one_row() -> None:
    table = sgd_table()
    ids = np.array([5, INT64_MIN, 5, 5, INT64_MIN, 7], dtype=np.int64)

    out = table.lookup_train(ids, None, 1.0, 1)

    assert len(table) == 3
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out[0], out[3])
    np.testing.assert_array_equal(out[1], out[4])
    assert table.stats().admissions == 3


# ------------------------------------------------------------------ collisions

INDEX_SIZE = 128  # a table with initial_capacity 64 has a 128-slot index until 89 rows


def colliding_ids(seed: np.uint64, homes: dict[int, int], rng: np.random.Generator) -> np.ndarray:
    """Distinct ids whose home slot in a 128-slot index is each key of `homes`, that many times."""
    found: list[np.ndarray] = []
    while True:
        candidates = np.unique(rng.integers(INT64_MIN, INT64_MAX, size=30_000, dtype=np.int64, endpoint=True))
        slots = hashes(candidates, seed) & np.uint64(INDEX_SIZE - 1)
        found = [candidates[slots == np.uint64(home)][:count] for home, count in homes.items()]
        if all(f.shape[0] == count for f, count in zip(found, homes.values())):
            break
    ids = np.concatenate(found)
    rng.shuffle(ids)
    return ids


# Homes 126, 127, 0 and 1: one long cluster that wraps around the end of the index, so
# backward-shift deletion has to handle homes on both sides of the wrap.
WRAPPING_HOMES = {127: 40, 126: 14, 0: 14, 1: 12}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_colliding_ids_survive_insertion_and_deletion(data: st.DataObject) -> None:
    table = sgd_table(initial_capacity=64)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="rng seed"))
    ids = colliding_ids(table._t.seed, WRAPPING_HOMES, rng)
    n = ids.shape[0]
    created = table.lookup_train(ids, None, 1.0, 1)
    table.apply_gradients(ids, markers(n), 2.0, 2)
    trained = created - markers(n)
    # Backward shift is exact only if the index really held one 80-long cluster.
    assert table._t.index.shape[0] == INDEX_SIZE
    assert np.count_nonzero(table._t.index >= 0) == n

    order = data.draw(st.permutations(range(n)), label="deletion order")
    n_deleted = data.draw(st.integers(0, n), label="deletions")
    deleted = np.array(order[:n_deleted], dtype=np.int64)
    one_by_one = data.draw(st.booleans(), label="one id per delete call")
    if one_by_one:
        for i in deleted:
            assert table.delete(ids[i : i + 1], 3) == 1
    else:
        assert table.delete(ids[deleted], 3) == n_deleted
    kept = np.setdiff1d(np.arange(n), deleted)

    assert len(table) == kept.shape[0]
    assert table.contains(ids[kept]).all()
    assert not table.contains(ids[deleted]).any()
    np.testing.assert_array_equal(table.lookup(ids[kept]), trained[kept])
    np.testing.assert_array_equal(table.lookup(ids[deleted]), np.zeros((n_deleted, DIM), np.float32))
    assert table.delete(ids[deleted], 4) == 0

    # Re-inserted ids come back with their initial vectors; the others are untouched.
    np.testing.assert_array_equal(table.lookup_train(ids[deleted], None, 5.0, 5), created[deleted])
    assert len(table) == n
    assert table._t.index.shape[0] == INDEX_SIZE
    np.testing.assert_array_equal(table.lookup(ids[kept]), trained[kept])
    np.testing.assert_array_equal(table.lookup(ids[deleted]), created[deleted])


def test_all_ids_in_one_slot_with_interleaved_deletes_and_inserts() -> None:
    table = sgd_table(initial_capacity=64)
    rng = np.random.default_rng(7)
    ids = colliding_ids(table._t.seed, {INDEX_SIZE - 1: 85}, rng)
    values: dict[int, np.ndarray] = {}
    live: set[int] = set()

    for step in range(2000):
        i = int(ids[rng.integers(ids.shape[0])])
        if i in live and rng.random() < 0.5:
            assert table.delete(np.array([i]), step + 1) == 1
            live.discard(i)
        elif i not in live:
            values[i] = table.lookup_train(np.array([i]), None, 1.0, step + 1)[0]
            live.add(i)
        if step % 50 == 0:
            alive = np.array(sorted(live), dtype=np.int64)
            dead = np.setdiff1d(ids, alive)
            expected = np.array([values[int(k)] for k in alive]).reshape(-1, DIM)
            np.testing.assert_array_equal(table.lookup(alive), expected)
            assert not table.contains(dead).any()
            assert len(table) == len(live)

    assert table._t.index.shape[0] == INDEX_SIZE


def test_rows_stay_found_when_the_index_is_rebuilt_around_a_cluster() -> None:
    table = sgd_table(initial_capacity=64)
    rng = np.random.default_rng(11)
    ids = colliding_ids(table._t.seed, {5: 60, 6: 20}, rng)
    created = table.lookup_train(ids, None, 1.0, 1)
    spread = np.arange(10**6, 10**6 + 500, dtype=np.int64)

    table.lookup_train(spread, None, 1.0, 2)  # grows the arena and rebuilds the index

    assert table._t.index.shape[0] > INDEX_SIZE
    np.testing.assert_array_equal(table.lookup(ids), created)
    table.delete(ids[::2], 3)
    assert not table.contains(ids[::2]).any()
    np.testing.assert_array_equal(table.lookup(ids[1::2]), created[1::2])
    assert table.contains(spread).all()


# --------------------------------------------------------------------- growth


def test_growth_from_eight_rows_to_fifty_thousand_then_reuse() -> None:
    table = sgd_table(initial_capacity=8)
    assert table._t.keys.shape[0] == 8
    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(INT64_MIN, INT64_MAX, size=52_000, dtype=np.int64, endpoint=True))[:50_000]
    rng.shuffle(ids)
    created = np.empty((ids.shape[0], DIM), dtype=np.float32)
    for start in range(0, ids.shape[0], 997):
        created[start : start + 997] = table.lookup_train(ids[start : start + 997], None, 1.0, 1 + start)

    assert len(table) == 50_000
    assert table.stats().rows == 50_000
    assert table._t.keys.shape[0] >= 50_000
    np.testing.assert_array_equal(table.lookup(ids), created)
    reference = sgd_table()
    np.testing.assert_array_equal(reference.lookup_train(ids, None, 1.0, 1), created)

    # Deleting N rows and creating N new ids reuses the freed rows: nothing grows.
    deleted, kept = ids[:10_000], ids[10_000:]
    assert table.delete(deleted, 10**6) == 10_000
    # The arena and index do not grow (the change log does record the new rows).
    arena_bytes = table._t.values.nbytes + table._t.index.nbytes
    capacity = table._t.keys.shape[0]
    high = int(table._t.meta[id_map.META_HIGH])
    fresh = np.arange(1, 10_001, dtype=np.int64) * 1_000_003
    fresh = fresh[~np.isin(fresh, ids)][:10_000]
    new_values = table.lookup_train(fresh, None, 2.0, 10**6 + 1)

    assert len(table) == 40_000 + fresh.shape[0]
    assert table._t.values.nbytes + table._t.index.nbytes == arena_bytes
    assert table._t.keys.shape[0] == capacity
    assert int(table._t.meta[id_map.META_HIGH]) == high
    np.testing.assert_array_equal(table.lookup(kept), created[10_000:])
    np.testing.assert_array_equal(table.lookup(fresh), new_values)
    assert not table.contains(deleted).any()


def test_meta_counts_live_and_high_water_rows() -> None:
    table = sgd_table(initial_capacity=8)
    table.lookup_train(np.arange(6), None, 1.0, 1)
    table.delete(np.array([1, 3]), 2)

    assert int(table._t.meta[id_map.META_LIVE]) == 4
    assert int(table._t.meta[id_map.META_HIGH]) == 6
    table.lookup_train(np.array([100, 101, 102]), None, 1.0, 3)
    # Two freed rows are reused before a never-used row is handed out.
    assert int(table._t.meta[id_map.META_HIGH]) == 7
    assert len(table) == 7


@pytest.mark.parametrize("rows", [0, 1, 4, 5, 100, 4096, 4097])
def test_index_capacity_keeps_at_most_half_load(rows: int) -> None:
    capacity = id_map.index_capacity_for(rows)

    assert capacity >= 8 and capacity & (capacity - 1) == 0
    assert capacity * 0.5 >= rows
    assert capacity == 8 or (capacity // 2) * 0.5 < rows
