"""The embedding cache's row store and its flags: rows come back exactly as stored, within the byte budget.

The cache in front of real shards (coherence, the staleness bound, restarts) is tested in
tests/integration/test_serving_cache.py.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monolith.common.errors import ConfigError
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import ModelConfig, load_model_config, default_config_path
from monolith.serving.embedding_cache import CacheConfig, CachedEmbeddings, add_cache_arguments, build_cache
from monolith.serving.row_cache import MIN_ROWS, RowCache, footprint

DIMS = {"item": 8, "item/bias": 1}
SHARDS = 2
EVERY_SHARD = np.ones(SHARDS, dtype=bool)


def rows_for(ids: np.ndarray, dim: int, tag: float) -> np.ndarray:
    """Rows that tell a put apart from every other: tag + position, in every column."""
    return np.repeat((tag + np.arange(ids.shape[0], dtype=np.float32))[:, None], dim, axis=1)


def owners_of(ids: np.ndarray) -> np.ndarray:
    return (np.abs(ids) % SHARDS).astype(np.uint16)


def get(cache: RowCache, name: str, ids: np.ndarray, usable: np.ndarray = EVERY_SHARD) -> tuple[np.ndarray, np.ndarray]:
    """(rows, hit mask) of a get."""
    out = np.full((ids.shape[0], DIMS[name]), np.nan, dtype=np.float32)
    hit = np.ones(ids.shape[0], dtype=bool)
    hit[cache.get(name, ids, usable, out)] = False
    return out, hit


def put(cache: RowCache, name: str, ids: np.ndarray, tag: float, evict: bool = True,
        allowed: np.ndarray = EVERY_SHARD) -> tuple[int, int]:  # fmt: skip
    return cache.put(name, ids, rows_for(ids, DIMS[name], tag), owners_of(ids), allowed, evict)


# ---------------------------------------------------------------------- exactness

ID = st.integers(-8, 40)  # few ids, so operations meet the same ones often
TABLE = st.sampled_from(sorted(DIMS))
MASK = st.lists(st.booleans(), min_size=SHARDS, max_size=SHARDS).map(lambda m: np.array(m, dtype=bool))
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), TABLE, st.lists(ID, max_size=40), st.booleans(), MASK),
        st.tuples(st.just("delete"), TABLE, st.lists(ID, max_size=20)),
        st.tuples(st.just("drop"), st.integers(0, SHARDS - 1)),
        st.tuples(st.just("get"), TABLE, st.lists(ID, max_size=40), MASK),
    ),
    max_size=40,
)


def _run(cache: RowCache, operations: list[tuple], complete: bool) -> None:
    """Runs operations against a dict of what was stored last; every hit must match it.

    With `complete` (a budget nothing is evicted from), every id stored and not dropped must hit.
    """
    model: dict[tuple[str, int], float] = {}
    for tag, operation in enumerate(operations):
        kind = operation[0]
        if kind == "put":
            _, name, ids, evict, allowed = operation
            ids = np.array(ids, dtype=np.int64)
            stored, _ = put(cache, name, ids, 1000.0 * tag, evict, allowed)
            if complete:
                assert stored == int(allowed[owners_of(ids)].sum())
            # An insert without room may be skipped, or evicted later, but an id held is overwritten.
            for i, id_ in enumerate(ids.tolist()):
                if allowed[owners_of(ids)[i]]:
                    model[(name, id_)] = 1000.0 * tag + i
        elif kind == "delete":
            _, name, ids = operation
            cache.delete(name, np.array(ids, dtype=np.int64))
            for id_ in ids:
                model.pop((name, id_), None)
        elif kind == "drop":
            cache.drop_owner(operation[1])
            model = {key: value for key, value in model.items() if abs(key[1]) % SHARDS != operation[1]}
        else:
            _, name, ids, usable = operation
            ids = np.array(ids, dtype=np.int64)
            out, hit = get(cache, name, ids, usable)
            for i, id_ in enumerate(ids.tolist()):
                if hit[i]:
                    assert usable[owners_of(ids)[i]], "a row of an unusable shard was answered"
                    assert (name, id_) in model, f"id {id_} of {name} was answered but is not stored"
                    np.testing.assert_array_equal(out[i], np.full(DIMS[name], model[(name, id_)], np.float32))
                elif complete and usable[owners_of(ids)[i]]:
                    assert (name, id_) not in model, f"id {id_} of {name} is stored but was missed"
        assert cache.bytes <= cache.budget
        assert cache.rows == sum(cache.table_rows(name) for name in DIMS)
        if complete:
            assert cache.rows == len(model)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS)
def test_rows_come_back_exactly_as_last_stored(operations: list[tuple]) -> None:
    _run(RowCache(DIMS, 1 << 20, SHARDS), operations, complete=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS)
def test_under_a_tight_budget_every_row_answered_is_still_exact(operations: list[tuple]) -> None:
    _run(RowCache(DIMS, RowCache.least_budget(DIMS), SHARDS), operations, complete=False)


# ---------------------------------------------------------------------- bytes and eviction


def test_eviction_keeps_the_bytes_within_the_budget() -> None:
    budget = 64 * 1024
    cache = RowCache(DIMS, budget, SHARDS)
    ids = np.arange(20_000, dtype=np.int64)

    for start in range(0, ids.shape[0], 500):
        for name in DIMS:
            put(cache, name, ids[start : start + 500], float(start))
        assert cache.bytes <= budget

    assert cache.evictions > 0
    assert 0 < cache.rows < ids.shape[0]
    for name in DIMS:  # each row put was tagged with its own id
        out, hit = get(cache, name, ids)
        kept = np.flatnonzero(hit)
        assert kept.shape[0] == cache.table_rows(name)
        np.testing.assert_array_equal(out[kept], np.repeat(kept.astype(np.float32)[:, None], DIMS[name], axis=1))


def test_a_budget_grows_no_store_past_it_and_is_shared_by_the_tables() -> None:
    budget = RowCache.least_budget(DIMS) + footprint(1000, DIMS["item"])
    cache = RowCache(DIMS, budget, SHARDS)

    put(cache, "item", np.arange(5000, dtype=np.int64), 0.0)  # the first table takes what it can...
    put(cache, "item/bias", np.arange(5000, dtype=np.int64), 0.0)  # ...but leaves every other a few rows

    assert cache.bytes <= budget
    assert cache.table_rows("item") >= 1000
    assert cache.table_rows("item/bias") >= MIN_ROWS


def test_clock_keeps_rows_that_are_hit_while_a_scan_passes() -> None:
    dims = {"item": 8}
    cache = RowCache(dims, footprint(1000, 8) + 1024, 1)
    one = np.ones(1, dtype=bool)
    hot = np.arange(100, dtype=np.int64)
    cache.put("item", hot, np.zeros((100, 8), np.float32), np.zeros(100, np.uint16), one, True)
    out = np.empty((100, 8), np.float32)

    for start in range(1000, 20_000, 100):  # 19 times the capacity, 100 new ids at a time
        scan = np.arange(start, start + 100, dtype=np.int64)
        cache.put("item", scan, np.ones((100, 8), np.float32), np.zeros(100, np.uint16), one, True)
        assert cache.get("item", hot, one, out).shape[0] == 0, f"a hot row was evicted by the scan at {start}"

    assert cache.evictions > 15_000


def test_inserts_without_eviction_overwrite_but_never_evict() -> None:
    cache = RowCache({"item": 8}, footprint(500, 8) + 1024, 1)
    one = np.ones(1, dtype=bool)
    full = np.arange(5000, dtype=np.int64)
    cache.put("item", full, np.zeros((5000, 8), np.float32), np.zeros(5000, np.uint16), one, True)
    held = cache.rows
    evictions = cache.evictions
    out = np.empty((5000, 8), np.float32)
    kept = np.setdiff1d(full, full[cache.get("item", full, one, out)])

    new = np.arange(10_000, 10_100, dtype=np.int64)
    both = np.concatenate([kept[:50], new])
    stored, evicted = cache.put("item", both, np.full((150, 8), 7.0, np.float32), np.zeros(150, np.uint16), one, False)

    assert (stored, evicted) == (50, 0)
    assert (cache.rows, cache.evictions) == (held, evictions)
    assert cache.get("item", kept[:50], one, out[:50]).shape[0] == 0
    assert (out[:50] == 7.0).all()
    assert cache.get("item", new, one, out[:100]).shape[0] == 100


def test_dropping_a_shard_drops_its_rows_only() -> None:
    cache = RowCache(DIMS, 1 << 20, SHARDS)
    ids = np.arange(1000, dtype=np.int64)
    put(cache, "item", ids, 0.0)

    assert cache.drop_owner(1) == 500
    _, hit = get(cache, "item", ids)
    np.testing.assert_array_equal(hit, owners_of(ids) == 0)
    assert cache.owned_rows(1) == 0 and cache.owned_rows(0) == 500


def test_rows_deleted_or_dropped_are_reused() -> None:
    cache = RowCache(DIMS, 1 << 20, SHARDS)
    ids = np.arange(1000, dtype=np.int64)
    put(cache, "item", ids, 0.0)
    size = cache.bytes

    assert cache.delete("item", ids[:300]) == 300
    assert cache.delete("item", ids[:300]) == 0
    assert cache.drop_owner(0) == 350
    assert cache.rows == cache.table_rows("item") == 350
    put(cache, "item", ids + 5000, 1.0)  # 650 rows free: the store grows only for the rest

    assert cache.rows == 1350
    out, hit = get(cache, "item", np.concatenate([ids, ids + 5000]))
    np.testing.assert_array_equal(hit, np.concatenate([(ids >= 300) & (owners_of(ids) == 1), np.ones(1000, bool)]))
    np.testing.assert_array_equal(out[1000:, 0], 1.0 + np.arange(1000, dtype=np.float32))
    assert cache.bytes <= 2 * size


def test_a_budget_that_cannot_hold_a_few_rows_of_every_table_is_refused() -> None:
    least = RowCache.least_budget(DIMS)
    with pytest.raises(ValueError, match=f"give at least {least} bytes"):
        RowCache(DIMS, least - 1, SHARDS)


# ---------------------------------------------------------------------- flags and the read-only backend


def _config() -> ModelConfig:
    return load_model_config(default_config_path())


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_cache_arguments(parser)
    return parser.parse_args(argv)


def test_flags_default_to_a_256_mib_cache_refreshed_every_tenth_of_a_second() -> None:
    args = _flags()
    shards = ShardedEmbeddingClient(["127.0.0.1:1"], _config().table_dims())
    try:
        cache = build_cache(args, shards, _config())
        assert cache is not None
        assert cache.config == CacheConfig(bytes=256 * 1024 * 1024, refresh_seconds=0.1, prefill="auto")
        assert cache.config.max_staleness == 0.2
        assert build_cache(_flags("--embedding-cache-bytes", "0"), shards, _config()) is None
    finally:
        shards.close()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--embedding-cache-bytes", "-1"], "--embedding-cache-bytes must be >= 0"),
        (["--embedding-cache-bytes", "1000"], "--embedding-cache-bytes 1000 cannot hold a few rows"),
        (["--embedding-cache-bytes", "lots"], "invalid int value"),
        (["--embedding-cache-refresh", "0"], "must be a number of seconds > 0"),
        (["--embedding-cache-refresh", "nan"], "must be a finite number of seconds"),
        (["--embedding-cache-prefill", "always"], "invalid choice"),
    ],
)
def test_bad_flag_values_are_refused_with_a_clear_message(argv: list[str], message: str) -> None:
    shards = ShardedEmbeddingClient(["127.0.0.1:1"], _config().table_dims())
    try:
        with pytest.raises((ConfigError, argparse.ArgumentError), match=message):
            build_cache(_flags(*argv), shards, _config())
    finally:
        shards.close()


def test_the_cache_is_read_only() -> None:
    shards = ShardedEmbeddingClient(["127.0.0.1:1"], DIMS)
    try:
        cache = CachedEmbeddings(shards, DIMS, CacheConfig(bytes=1 << 20))
        with pytest.raises(ValueError, match="serving lookups only"):
            cache.lookup({"item": np.arange(3)}, training=True)
        with pytest.raises(ValueError, match="read-only"):
            cache.apply_gradients({"item": (np.arange(3), np.zeros((3, 8), np.float32))})
        with pytest.raises(ValueError, match="unknown table 'user'"):
            cache.lookup({"user": np.arange(3)})
    finally:
        shards.close()
