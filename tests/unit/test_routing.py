"""Routing many tables at once: the same unique ids, counts and owners as table by table, rows back in order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps.routing import dedupe_and_route, dedupe_and_route_tables, route_to_shards, unpack_rows

NAMES = ("user", "user/bias", "item", "genres", "genres/bias")

# Per table: ids drawn from a small range (so duplicates are common) or anywhere in int64.
table_ids = st.one_of(
    st.lists(st.integers(-50, 50), max_size=60),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20),
)


def routed(batch: list[list[int]], dims: list[int], num_shards: int):  # type: ignore[no-untyped-def]
    arrays = [np.array(ids, dtype=np.int64) for ids in batch]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.shape[0] for a in arrays], out=offsets[1:])
    salts = np.array([stable_hash64(n) for n in NAMES[: len(arrays)]], dtype=np.uint64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    out = dedupe_and_route_tables(flat, offsets, salts, np.array(dims, np.int64), np.uint64(num_shards))
    return arrays, offsets, salts, out


def reference(ids: np.ndarray, salt: int, num_shards: int) -> list[tuple[list[int], list[int]]]:
    """Per shard, (its distinct ids in first-seen order, their counts), the plain way."""
    owners = route_to_shards(ids, salt, num_shards)
    out: list[tuple[list[int], list[int]]] = []
    for shard in range(num_shards):
        counts: dict[int, int] = {}
        for i, owner in zip(ids.tolist(), owners.tolist()):
            if owner == shard:
                counts[i] = counts.get(i, 0) + 1
        out.append((list(counts), list(counts.values())))
    return out


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(table_ids, max_size=len(NAMES)), num_shards=st.integers(1, 4))
def test_each_block_holds_that_shards_distinct_ids_in_first_seen_order(batch: list[list[int]], num_shards: int) -> None:
    arrays, _, salts, (unique, counts, bounds, _) = routed(batch, [1] * len(batch), num_shards)
    tables = len(arrays)

    assert bounds.shape == (num_shards * tables + 1,) and bounds[-1] == unique.shape[0]
    for t, ids in enumerate(arrays):
        for shard, (expected_ids, expected_counts) in enumerate(reference(ids, int(salts[t]), num_shards)):
            block = slice(bounds[shard * tables + t], bounds[shard * tables + t + 1])
            assert unique[block].tolist() == expected_ids
            assert counts[block].tolist() == expected_counts


@settings(max_examples=100, deadline=None)
@given(ids=table_ids, num_shards=st.integers(1, 4))
def test_one_table_routing_gives_each_id_its_position_among_the_unique(ids: list[int], num_shards: int) -> None:
    array = np.array(ids, dtype=np.int64)
    salt = stable_hash64("user")

    unique, inverse, counts, edges = dedupe_and_route(array, np.uint64(salt), np.uint64(num_shards))

    np.testing.assert_array_equal(unique[inverse], array)
    for shard, (expected_ids, expected_counts) in enumerate(reference(array, salt, num_shards)):
        assert unique[edges[shard] : edges[shard + 1]].tolist() == expected_ids
        assert counts[edges[shard] : edges[shard + 1]].tolist() == expected_counts


@settings(max_examples=200, deadline=None)
@given(
    batch=st.lists(table_ids, max_size=len(NAMES)),
    num_shards=st.integers(1, 4),
    dim_choices=st.lists(st.integers(1, 5), min_size=len(NAMES), max_size=len(NAMES)),
)
def test_rows_answered_block_by_block_come_back_in_input_order(
    batch: list[list[int]], num_shards: int, dim_choices: list[int]
) -> None:
    dims = dim_choices[: len(batch)]
    arrays, offsets, _, (unique, _, bounds, source) = routed(batch, dims, num_shards)
    tables = len(arrays)

    def row(t: int, i: int) -> np.ndarray:  # what a shard would answer for id i of table t
        return (np.float32(i % 1000) + np.arange(dims[t], dtype=np.float32) / 10 + 100 * t).astype(np.float32)

    answers = [
        row(b % tables, int(i))
        for b in range(num_shards * tables)
        for i in unique[bounds[b] : bounds[b + 1]]
    ]
    values = np.concatenate(answers) if answers else np.zeros(0, np.float32)
    out = np.full(sum(a.shape[0] * d for a, d in zip(arrays, dims)), np.nan, np.float32)

    unpack_rows(values, source, offsets, np.array(dims, np.int64), out)

    start = 0
    for t, ids in enumerate(arrays):
        got = out[start : start + ids.shape[0] * dims[t]].reshape(ids.shape[0], dims[t])
        expected = np.array([row(t, int(i)) for i in ids], np.float32).reshape(ids.shape[0], dims[t])
        np.testing.assert_array_equal(got, expected)
        start += ids.shape[0] * dims[t]
