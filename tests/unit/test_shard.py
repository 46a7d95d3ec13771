"""The shard core: whole-request validation, roles, the version clock, export/import."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterator

import numpy as np
import pytest

from monolith.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from monolith.embedding.config import AdmissionConfig, InitializerConfig, OptimizerConfig, TableConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps.routing import route_to_shards
from monolith.embedding.table import RowBatch
from monolith.common.config import parse_config
from monolith.common.errors import ConfigError
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig

TABLES = (
    TableConfig(name="user", dim=4, optimizer=OptimizerConfig(kind="adagrad"), expire_after=100),
    TableConfig(
        name="item",
        dim=2,
        initializer=InitializerConfig(kind="normal", scale=0.1),
        optimizer=OptimizerConfig(kind="ftrl"),
        admission=AdmissionConfig(filter="counting", threshold=2),
    ),
)


def make_shard(role: str = "training", shard: int = 0, num_shards: int = 2, **kwargs: Any) -> EmbeddingShard:
    return EmbeddingShard(ShardConfig(shard=shard, num_shards=num_shards, role=role, tables=TABLES, **kwargs))


def ids_for(name: str, shard: int, n: int, num_shards: int = 2, offset: int = 0) -> np.ndarray:
    """n distinct ids of `name` that route to `shard`."""
    candidates = np.arange(offset, offset + 50 * n + 100, dtype=np.int64) * 7_777_777_777 - 3
    owners = route_to_shards(candidates, stable_hash64(name), num_shards)
    chosen = candidates[owners == shard][:n]
    assert chosen.shape[0] == n
    return chosen


USER = ids_for("user", 0, 30)
ITEM = ids_for("item", 0, 20)
FOREIGN_USER = ids_for("user", 1, 3)
FOREIGN_ITEM = ids_for("item", 1, 3)


def trained_shard(**kwargs: Any) -> EmbeddingShard:
    shard = make_shard(**kwargs)
    shard.lookup([("user", USER, None)], True, 1000.0)
    # Threshold 2: the first 15 items are admitted at once, the last 5 stay pending.
    shard.lookup([("item", ITEM, np.array([2] * 15 + [1] * 5, np.int32))], True, 1000.0)
    shard.apply_gradients(
        [("user", USER[:10], np.ones((10, 4), np.float32)), ("item", ITEM[:4], np.full((4, 2), 0.5, np.float32))],
        1010.0,
    )
    return shard


def rows_of(shard: EmbeddingShard, name: str, include_state: bool) -> tuple[list[int], bytes, list[int]]:
    """Every row of one table, sorted by id: (ids, value bytes, update times)."""
    table = shard.tables[name]
    batches = list(table.export(0, include_state, 10_000))
    if not batches:
        return [], b"", []
    ids = np.concatenate([b.ids for b in batches])
    order = np.argsort(ids)
    values = np.concatenate([b.values for b in batches])[order]
    times = np.concatenate([b.update_times for b in batches])[order]
    return ids[order].tolist(), values.tobytes(), times.tolist()


def snapshot(shard: EmbeddingShard) -> tuple[Any, ...]:
    """Everything a request could change: version, stats, rows with state, deletions, data clock."""
    tables = [
        (name, rows_of(shard, name, True), sorted(table.deleted_since(0)), table._max_update_time)
        for name, table in sorted(shard.tables.items())
    ]
    return shard.version, shard.stats(), tables


@contextlib.contextmanager
def rejected(shard: EmbeddingShard, error: type[Exception], match: str) -> Iterator[None]:
    """Expects the block to raise `error` and to leave the shard exactly as it was."""
    before = snapshot(shard)
    with pytest.raises(error, match=match):
        yield
    assert snapshot(shard) == before


# ----------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_shards": 0}, "num_shards"),
        ({"shard": 2}, "shard"),
        ({"shard": -1}, "shard"),
        ({"role": "primary"}, "role"),
        ({"tables": ()}, "tables"),
        ({"max_ids_per_request": 0}, "max_ids_per_request"),
        ({"export_chunk_rows": 0}, "export_chunk_rows"),
        ({"initial_capacity": 0}, "initial_capacity"),
    ],
)
def test_shard_config_rejects(kwargs: dict[str, Any], field: str) -> None:
    base: dict[str, Any] = {"shard": 0, "num_shards": 2, "role": "training", "tables": TABLES}
    with pytest.raises(ConfigError, match=f"^{field}: "):
        parse_config(ShardConfig, {**base, **kwargs})


# -------------------------------------------------------------- happy path


def test_training_lookup_creates_rows_and_bumps_the_version() -> None:
    shard = make_shard()

    user, item = shard.lookup([("user", USER, None), ("item", ITEM, None)], True, 1000.0)

    assert user.shape == (30, 4) and item.shape == (20, 2)
    assert shard.version == 1
    stats = shard.stats()
    assert stats["user"].rows == 30
    assert (stats["item"].rows, stats["item"].pending_ids) == (0, 20)  # counting filter, threshold 2
    np.testing.assert_array_equal(shard.lookup([("user", USER, None)], False)[0], user)
    assert shard.version == 1  # serving reads are not mutations


def test_update_time_zero_stamps_the_table_clock_and_never_moves_it() -> None:
    # Trained on 1997 data; an untimed update (0) must not move the clock to today, or the
    # next sweep would evict every row trained on that data.
    shard = make_shard()
    day_1997 = 852_076_800.0
    shard.lookup([("user", USER[:20], None)], True, day_1997)
    shard.apply_gradients([("user", USER[:5], np.ones((5, 4), np.float32))], day_1997 + 50)

    shard.lookup([("user", USER[20:23], None)], True, 0.0)
    shard.apply_gradients([("user", USER[5:8], np.ones((3, 4), np.float32))], 0.0)

    table = shard.tables["user"]
    assert table.newest_update_time == day_1997 + 50 == shard.stats()["user"].newest_update_time
    times = {int(i): int(t) for b in table.export(0, False, 100) for i, t in zip(b.ids, b.update_times)}
    assert all(times[int(i)] == day_1997 + 50 for i in USER[20:23])  # created untimed: the clock
    assert all(times[int(i)] == day_1997 + 50 for i in USER[5:8])  # updated untimed: the clock
    assert all(times[int(i)] == day_1997 for i in USER[8:20])  # untouched
    assert shard.expire() == {"user": 0, "item": 0}  # expire_after 100 s of data time
    assert table.contains(USER[:23]).all()

    # Data time moving on does expire what it passed by.
    shard.apply_gradients([("user", USER[:1], np.ones((1, 4), np.float32))], day_1997 + 120)
    assert shard.expire()["user"] == 12  # USER[8:20], last updated at day_1997
    assert table.contains(USER[:8]).all() and table.contains(USER[20:23]).all()


def test_apply_gradients_reports_updated_and_dropped() -> None:
    shard = make_shard()
    shard.lookup([("user", USER[:5], None), ("item", ITEM[:3], None)], True, 1000.0)

    result = shard.apply_gradients(
        [("user", USER[:8], np.ones((8, 4), np.float32)), ("item", ITEM[:3], np.ones((3, 2), np.float32))], 1001.0
    )

    assert result == (5, 6)  # 3 user ids without rows, 3 item ids not yet admitted
    assert shard.version == 2
    assert shard.stats()["user"].filtered_gradients == 3


def test_expire_runs_every_table() -> None:
    shard = trained_shard()

    evicted = shard.expire(now=1105.0)

    assert evicted == {"user": 20, "item": 0}  # only user expires; 10 of its rows were updated at 1010
    assert shard.stats()["user"].rows == 10


# -------------------------------------------------------------- rejections


def test_unknown_table_is_rejected_everywhere() -> None:
    shard = trained_shard()
    rows = RowBatch(USER[:1], np.zeros((1, 4), np.float32), np.zeros(1, np.uint32))

    for training in (True, False):
        with rejected(shard, InvalidArgument, "unknown table 'genre'; this shard has: item, user"):
            shard.lookup([("genre", USER, None)], training, 1000.0)
    with rejected(shard, InvalidArgument, "unknown table 'genre'"):
        shard.apply_gradients([("genre", USER[:1], np.zeros((1, 4), np.float32))], 1000.0)
    with rejected(shard, InvalidArgument, "unknown table 'genre'"):
        shard.import_chunk("genre", rows, np.zeros(0, np.int64))
    with rejected(shard, InvalidArgument, "unknown table 'genre'"):
        list(shard.export(0, True, tables=["genre"]))


def test_ids_of_another_shard_are_rejected() -> None:
    shard = trained_shard()
    mixed = np.concatenate([USER[:5], FOREIGN_USER[:1], USER[5:7]])
    foreign_rows = RowBatch(FOREIGN_USER, np.zeros((3, 4), np.float32), np.zeros(3, np.uint32))
    no_rows = RowBatch(USER[:0], np.zeros((0, 4), np.float32), np.zeros(0, np.uint32))

    for training in (True, False):
        message = rf"table 'user': 1 id\(s\) belong to other shards, e.g. id {FOREIGN_USER[0]} belongs to shard 1"
        with rejected(shard, InvalidArgument, message):
            shard.lookup([("user", mixed, None)], training, 1000.0)
    with rejected(shard, InvalidArgument, "belongs to shard 1, not 0"):
        shard.apply_gradients([("item", FOREIGN_ITEM, np.zeros((3, 2), np.float32))], 1000.0)
    with rejected(shard, InvalidArgument, "belong to other shards"):
        shard.import_chunk("user", foreign_rows, np.zeros(0, np.int64))
    with rejected(shard, InvalidArgument, "belong to other shards"):
        shard.import_chunk("user", no_rows, FOREIGN_USER)


def test_routing_is_per_table() -> None:
    # An id can belong to shard 0 in one table and to shard 1 in another.
    candidates = ids_for("user", 0, 200)
    item_owner = route_to_shards(candidates, stable_hash64("item"), 2)
    assert (item_owner == 1).any() and (item_owner == 0).any()
    shard = make_shard()
    crossed = candidates[item_owner == 1][:3]

    shard.lookup([("user", crossed, None)], True, 1.0)
    with pytest.raises(InvalidArgument, match="belong to other shards"):
        shard.lookup([("item", crossed, None)], True, 1.0)


@pytest.mark.parametrize(
    ("grads", "match"),
    [
        (np.zeros((3, 5), np.float32), r"shape \(3, 5\) do not match 3 ids x dim 4"),
        (np.zeros((2, 4), np.float32), r"shape \(2, 4\) do not match 3 ids x dim 4"),
        (np.zeros(12, np.float32), r"shape \(12,\) do not match"),
        (np.zeros((3, 4, 1), np.float32), r"shape \(3, 4, 1\) do not match"),
        (np.array([[0, 0, 0, 0], [0, np.nan, 0, 0], [0, 0, 0, 0]], np.float32), r"non-finite value.*\(1, 1\)"),
        (np.array([[0, 0, 0, np.inf]] * 3, np.float32), "3 non-finite value"),
        (np.array([[-np.inf, 0, 0, 0]] * 3, np.float32), "non-finite"),
    ],
)
def test_bad_gradients_are_rejected(grads: np.ndarray, match: str) -> None:
    shard = trained_shard()

    with rejected(shard, InvalidArgument, match):
        shard.apply_gradients([("user", USER[:3], grads)], 1000.0)


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        (np.array([1, 0, 1], np.int32), "occurrence counts must be >= 1, got 0"),
        (np.array([1, -4, 1], np.int32), "occurrence counts must be >= 1, got -4"),
        (np.array([1, 1], np.int32), "2 counts for 3 ids"),
        (np.array([1, 1, 1, 1], np.int32), "4 counts for 3 ids"),
    ],
)
def test_bad_counts_are_rejected(counts: np.ndarray, match: str) -> None:
    shard = trained_shard()

    with rejected(shard, InvalidArgument, match):
        shard.lookup([("item", ITEM[10:13], counts)], True, 1.0)


def test_oversized_requests_are_rejected() -> None:
    shard = trained_shard(max_ids_per_request=30)
    user, item = USER[:20], ITEM[:11]
    grads = [("user", user, np.zeros((20, 4), np.float32)), ("item", item, np.zeros((11, 2), np.float32))]
    rows = RowBatch(USER[:21], np.zeros((21, 4), np.float32), np.zeros(21, np.uint32))

    for training in (True, False):
        with rejected(shard, ResourceExhausted, "carries 31 ids; the limit is max_ids_per_request=30"):
            shard.lookup([("user", user, None), ("item", item, None)], training, 1000.0)
    with rejected(shard, ResourceExhausted, "carries 31 ids"):
        shard.apply_gradients(grads, 1000.0)
    with rejected(shard, ResourceExhausted, "carries 31 ids"):
        shard.import_chunk("user", rows, USER[20:30])  # 21 rows + 10 deletions
    # Exactly at the limit is fine.
    shard.lookup([("user", USER[:19], None), ("item", item, None)], True, 1000.0)


def test_serving_shard_is_read_only_to_clients() -> None:
    shard = make_shard(role="serving")

    with rejected(shard, FailedPrecondition, "role 'serving': training lookups need a training shard"):
        shard.lookup([("user", USER, None)], True, 1000.0)
    with rejected(shard, FailedPrecondition, "read-only"):
        shard.apply_gradients([("user", USER[:1], np.zeros((1, 4), np.float32))], 1000.0)
    rows = RowBatch(USER[:1], np.ones((1, 4), np.float32), np.zeros(1, np.uint32))
    with rejected(shard, FailedPrecondition, "role 'serving': it changes only by sync from its training shard"):
        shard.import_chunk("user", rows, np.zeros(0, np.int64))
    out = shard.lookup([("user", USER, None)], False)
    np.testing.assert_array_equal(out[0], np.zeros((30, 4), np.float32))
    assert shard.version == 0


@pytest.mark.parametrize("update_time", [-1.0, math.nan, math.inf, -math.inf])
def test_bad_update_time_is_rejected(update_time: float) -> None:
    shard = trained_shard()

    with rejected(shard, InvalidArgument, "update_time must be a finite number of seconds >= 0"):
        shard.lookup([("user", USER, None)], True, update_time)
    with rejected(shard, InvalidArgument, "update_time must be a finite number of seconds >= 0"):
        shard.apply_gradients([("user", USER[:1], np.ones((1, 4), np.float32))], update_time)


def test_a_table_repeated_in_one_request_is_rejected() -> None:
    shard = trained_shard()

    with rejected(shard, InvalidArgument, "table 'user' appears more than once"):
        shard.lookup([("user", USER[:2], None), ("user", USER[2:4], None)], True, 1.0)


@pytest.mark.parametrize(
    ("bad_table", "match"),
    [
        (("item", FOREIGN_ITEM, None), "belong to other shards"),
        (("item", ITEM[:2], np.array([1, 0], np.int32)), "counts must be >= 1"),
        (("genre", ITEM[:2], None), "unknown table"),
    ],
)
def test_one_bad_table_fails_the_whole_lookup(bad_table: tuple[str, np.ndarray, Any], match: str) -> None:
    shard = trained_shard()
    new_users = ids_for("user", 0, 5, offset=10**6)

    with rejected(shard, InvalidArgument, match):
        shard.lookup([("user", new_users, None), bad_table], True, 1000.0)
    assert not shard.tables["user"].contains(new_users).any()


@pytest.mark.parametrize(
    ("bad_table", "match"),
    [
        (("item", ITEM[:2], np.full((2, 2), np.nan, np.float32)), "non-finite"),
        (("item", ITEM[:2], np.ones((2, 3), np.float32)), "do not match"),
        (("item", FOREIGN_ITEM[:2], np.ones((2, 2), np.float32)), "belong to other shards"),
    ],
)
def test_one_bad_table_fails_the_whole_gradient_request(
    bad_table: tuple[str, np.ndarray, np.ndarray], match: str
) -> None:
    shard = trained_shard()
    good_table = ("user", USER[:5], np.ones((5, 4), np.float32))

    with rejected(shard, InvalidArgument, match):
        shard.apply_gradients([good_table, bad_table], 2000.0)


def test_bad_import_chunks_are_rejected() -> None:
    shard = trained_shard()
    times = np.zeros(2, np.uint32)
    too_wide = RowBatch(USER[:2], np.zeros((2, 5), np.float32), times)
    not_finite = RowBatch(USER[:2], np.full((2, 4), np.nan, np.float32), times)

    with rejected(shard, InvalidArgument, "rows of width 5 fit neither the embedding dim 4 nor the full row width 8"):
        shard.import_chunk("user", too_wide, np.zeros(0, np.int64))
    with rejected(shard, InvalidArgument, "values: 8 non-finite"):
        shard.import_chunk("user", not_finite, USER[2:4])


@pytest.mark.parametrize(("since", "max_rows"), [(-1, 0), (0, -1)])
def test_bad_export_arguments_are_rejected(since: int, max_rows: int) -> None:
    shard = trained_shard()

    with rejected(shard, InvalidArgument, "must be >= 0"):
        list(shard.export(since, True, max_rows))


# -------------------------------------------------------------- export/import


def sync(source: EmbeddingShard, target: EmbeddingShard, since: int, include_state: bool, max_rows: int) -> int:
    """Imports source's export since `since` into target; returns the version to resume from."""
    version = since
    for chunk in source.export(since, include_state, max_rows):
        assert chunk.includes_optimizer_state == include_state
        assert chunk.rows.ids.shape[0] <= max_rows and chunk.deleted_ids.shape[0] <= max_rows
        target.apply_synced_chunk(chunk.table, chunk.rows, chunk.deleted_ids)
        version = chunk.version
    return version


def test_serving_shard_follows_the_training_shard() -> None:
    training = trained_shard()
    serving = make_shard(role="serving")
    probe = [("user", USER, None), ("item", ITEM, None)]

    version = sync(training, serving, 0, include_state=False, max_rows=7)

    assert version == training.version
    for (name, _, _), a, b in zip(probe, training.lookup(probe, False), serving.lookup(probe, False)):
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert rows_of(training, name, False) == rows_of(serving, name, False)

    # More training, an expiry and a new id; the next sync carries only those changes.
    more_users = ids_for("user", 0, 4, offset=10**6)
    training.lookup([("user", more_users, None)], True, 1100.0)
    training.apply_gradients([("user", USER[:3], np.ones((3, 4), np.float32))], 1100.0)
    evicted = training.expire()
    assert evicted["user"] == 20
    changes = list(training.export(version, False, 1000))
    assert {c.table for c in changes} == {"user"}
    assert sorted(np.concatenate([c.rows.ids for c in changes]).tolist()) == sorted([*USER[:3], *more_users])
    assert sorted(np.concatenate([c.deleted_ids for c in changes]).tolist()) == sorted(USER[10:])

    version = sync(training, serving, version, include_state=False, max_rows=5)

    assert version == training.version
    all_users = np.concatenate([USER, more_users])
    served = serving.lookup([("user", all_users, None)], False)[0]
    np.testing.assert_array_equal(served, training.lookup([("user", all_users, None)], False)[0])
    assert not serving.tables["user"].contains(USER[10:]).any()
    assert rows_of(training, "user", False) == rows_of(serving, "user", False)
    assert rows_of(training, "item", False) == rows_of(serving, "item", False)


def test_full_state_sync_between_training_shards() -> None:
    source = trained_shard()
    standby = make_shard()

    sync(source, standby, 0, include_state=True, max_rows=1000)

    for name in ("user", "item"):
        assert rows_of(source, name, True) == rows_of(standby, name, True)
    grads = [("user", USER[:6], np.full((6, 4), 0.25, np.float32))]
    source.apply_gradients(grads, 2000.0)
    standby.apply_gradients(grads, 2000.0)
    assert rows_of(source, "user", True) == rows_of(standby, "user", True)


def test_lookup_whose_answer_is_too_large_is_rejected() -> None:
    shard = trained_shard(max_message_bytes=4096)
    many_users = ids_for("user", 0, 400, offset=10**6)

    with rejected(shard, ResourceExhausted, "max message size"):
        shard.lookup([("user", many_users, None)], True, 1000.0)
    shard.lookup([("user", many_users[:20], None)], True, 1000.0)


def test_export_chunks_fit_the_request_limit_of_a_shard_configured_alike() -> None:
    source = trained_shard()
    serving = make_shard(role="serving", max_ids_per_request=7)
    limited = EmbeddingShard(source.config.model_copy(update={"max_ids_per_request": 7}))
    sync(source, limited, 0, include_state=True, max_rows=7)

    for chunk in limited.export(0, False):
        assert chunk.rows.ids.shape[0] + chunk.deleted_ids.shape[0] <= 7
        serving.apply_synced_chunk(chunk.table, chunk.rows, chunk.deleted_ids)

    for name in ("user", "item"):
        assert rows_of(serving, name, False) == rows_of(source, name, False)


def test_export_of_selected_tables() -> None:
    shard = trained_shard()

    chunks = list(shard.export(0, False, 0, tables=["item"]))

    assert {c.table for c in chunks} == {"item"}
    assert sum(c.rows.ids.shape[0] for c in chunks) == shard.stats()["item"].rows
    assert all(c.version == shard.version for c in chunks)


# ------------------------------------------- inconsistent chunks (regressions)


def test_import_chunk_with_inconsistent_row_batch_changes_nothing() -> None:
    """ids and values of different lengths are InvalidArgument, checked before anything applies.

    Regression: import_chunk once checked only the rows' width, and the table's upsert
    raised ValueError after the chunk's deletions were applied, so a bad chunk
    half-applied (and surfaced as INTERNAL)."""
    shard = trained_shard()
    rows = RowBatch(USER[:2], np.zeros((3, 4), np.float32), np.zeros(2, np.uint32))
    before = snapshot(shard)

    with pytest.raises(Exception) as info:
        shard.import_chunk("user", rows, USER[5:8])

    assert shard.tables["user"].contains(USER[5:8]).all(), "the chunk's deletions were applied"
    assert snapshot(shard) == before
    assert isinstance(info.value, InvalidArgument)


def test_import_chunk_with_too_few_update_times_is_rejected() -> None:
    """len(update_times) must equal len(ids): the numba upsert kernel does no bounds checks,
    so a shorter array would stamp rows with whatever memory follows it (as it once did)."""
    shard = make_shard(role="serving")
    rows = RowBatch(USER[:5], np.ones((5, 4), np.float32), np.zeros(0, np.uint32))

    with rejected(shard, InvalidArgument, "update_times"):
        shard.apply_synced_chunk("user", rows, np.zeros(0, np.int64))


# ------------------------------------------------------------------ data time bounds


def test_an_update_time_far_ahead_of_the_clock_is_refused_and_changes_nothing() -> None:
    # One such time would move the tables' data clock, and the next sweep would evict every row.
    shard = make_shard()
    shard.lookup([("user", USER, None)], True, 1000.0)
    ahead = time.time() + 2 * 86_400

    with rejected(shard, InvalidArgument, "max_time_ahead"):
        shard.lookup([("user", USER[:1], None)], True, ahead)
    with rejected(shard, InvalidArgument, "max_time_ahead"):
        shard.apply_gradients([("user", USER[:1], np.zeros((1, 4), np.float32))], ahead)
    rows = RowBatch(USER[:1], np.ones((1, 4), np.float32), np.array([ahead], np.uint32))
    with rejected(shard, InvalidArgument, "max_time_ahead"):
        shard.import_chunk("user", rows, np.zeros(0, np.int64))

    assert shard.expire() == {"user": 0, "item": 0}
    assert shard.tables["user"].contains(USER).all()


def test_an_export_of_the_same_table_twice_is_refused() -> None:
    shard = make_shard()

    with pytest.raises(InvalidArgument, match="tables to export must be distinct"):
        list(shard.export(0, False, 0, ["user", "user"]))


def test_a_shard_config_with_two_tables_of_one_name_is_refused() -> None:
    base = {"shard": 0, "num_shards": 1, "role": "training", "tables": (TABLES[0], TABLES[0])}

    with pytest.raises(ConfigError, match="tables: names must be distinct"):
        parse_config(ShardConfig, base)
