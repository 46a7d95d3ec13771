"""Exports from the change log: an incremental export brings a copy taken at any earlier
version exactly up to date, costs only the changes, and holds each mutation whole."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.waiting import wait_for
from monolith.common.errors import FailedPrecondition
from monolith.embedding import change_log as change_log_module
from monolith.embedding import table as table_module
from monolith.embedding.config import AdmissionConfig, InitializerConfig, OptimizerConfig, TableConfig
from monolith.embedding.table import EmbeddingTable, RowBatch
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig

Rows = dict[int, tuple[bytes, int]]  # id -> (value bytes, update time)
State = dict[str, Rows]

TABLES = (
    TableConfig(name="user", dim=3, optimizer=OptimizerConfig(kind="adagrad"), expire_after=100.0),
    TableConfig(
        name="item",
        dim=2,
        optimizer=OptimizerConfig(kind="ftrl"),
        admission=AdmissionConfig(filter="counting", threshold=2),
    ),
)
DEADLINE = 30.0  # seconds a test waits for a condition before failing


@contextlib.contextmanager
def small_limits() -> Iterator[None]:
    """Limits small enough that a short sequence compacts the change log, thins mark
    records, forgets deletions and sweeps in several windows."""
    with (
        mock.patch.multiple(change_log_module, LOG_SLACK=4, MAX_MARKS=4, MAX_DELETION_LOG=10),
        mock.patch.multiple(table_module, EXPIRY_WINDOW_ROWS=5, EXPIRY_WINDOW_EVICTIONS=3, EXPIRY_SCAN_ROWS=7),
    ):
        yield


def table_rows(table: EmbeddingTable) -> Rows:
    """Every live row of a table, by a full scan (export since 0)."""
    rows: Rows = {}
    for batch in table.export(0, True, 1000):
        for i, key in enumerate(batch.ids.tolist()):
            rows[key] = (batch.values[i].tobytes(), int(batch.update_times[i]))
    return rows


def shard_state(shard: EmbeddingShard) -> State:
    return {name: table_rows(table) for name, table in shard.tables.items()}


def apply_changes(state: State, name: str, rows: RowBatch, deleted: np.ndarray) -> None:
    """What a consumer does with one chunk: deletions first, then upserts."""
    for key in deleted.tolist():
        state[name].pop(key, None)
    for i, key in enumerate(rows.ids.tolist()):
        state[name][key] = (rows.values[i].tobytes(), int(rows.update_times[i]))


# ----------------------------------------------------------------- operations

ids_strategy = st.lists(st.integers(0, 40), min_size=1, max_size=12)
time_strategy = st.integers(1000, 1400)
operation = st.one_of(
    st.tuples(st.just("train"), st.sampled_from(["user", "item"]), ids_strategy, time_strategy),
    st.tuples(st.just("push"), ids_strategy, ids_strategy, time_strategy),  # both tables at once
    st.tuples(st.just("import"), st.sampled_from(["user", "item"]), ids_strategy, time_strategy),
    st.tuples(st.just("delete"), st.sampled_from(["user", "item"]), ids_strategy),
    st.tuples(st.just("expire"), st.one_of(st.none(), time_strategy)),
    st.tuples(st.just("export"), st.integers(1, 9)),
)


def run(shard: EmbeddingShard, op: tuple[Any, ...], rng: np.random.Generator) -> None:
    """Applies one random mutation (or an export, which records a mark) to a training shard."""
    kind = op[0]
    if kind == "train":
        _, name, ids, now = op
        shard.lookup([(name, np.array(ids, np.int64), None)], True, float(now))
    elif kind == "push":
        _, users, items, now = op
        requests = []
        for name, ids in (("user", users), ("item", items)):
            unique = np.unique(np.array(ids, np.int64))
            grads = rng.normal(0, 1, (unique.shape[0], shard.tables[name].dim)).astype(np.float32)
            requests.append((name, unique, grads))
        shard.apply_gradients(requests, float(now))
    elif kind == "import":
        _, name, ids, now = op
        unique = np.unique(np.array(ids, np.int64))
        width = shard.tables[name].width if rng.random() < 0.5 else shard.tables[name].dim
        values = rng.normal(0, 1, (unique.shape[0], width)).astype(np.float32)
        shard.import_chunk(name, RowBatch(unique, values, np.full(unique.shape[0], now, np.uint32)), np.zeros(0, np.int64))
    elif kind == "delete":
        _, name, ids = op
        shard.import_chunk(name, RowBatch(np.zeros(0, np.int64), np.zeros((0, shard.tables[name].dim), np.float32),
                                          np.zeros(0, np.uint32)), np.array(ids, np.int64))  # fmt: skip
    elif kind == "expire":
        shard.expire(None if op[1] is None else float(op[1]))
    else:
        list(shard.export(shard.version, False, op[1]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(operation, max_size=30),
    picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
    chunk_rows=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_incremental_export_brings_any_earlier_copy_up_to_date(
    ops: list[tuple[Any, ...]], picks: list[int], chunk_rows: int, seed: int
) -> None:
    """The change-log export equals a full-scan export: for a copy of the shard taken at
    any earlier version S (a mark of an earlier export, or the version after any
    mutation), applying the export since S gives exactly the shard's rows now."""
    rng = np.random.default_rng(seed)
    with small_limits():
        shard = EmbeddingShard(ShardConfig(shard=0, num_shards=1, role="training", tables=TABLES,
                                           export_chunk_rows=chunk_rows, initial_capacity=8))  # fmt: skip
        copies: dict[int, State] = {0: shard_state(shard)}
        for op in ops:
            run(shard, op, rng)
            copies[shard.version] = shard_state(shard)
        now = shard_state(shard)
        versions = sorted(copies)
        for pick in picks:
            since = versions[pick % len(versions)]
            copy = {name: dict(rows) for name, rows in copies[since].items()}
            try:
                chunks = list(shard.export(since, True, chunk_rows))
            except FailedPrecondition:
                # Only when deletions after `since` were forgotten; the consumer copies in full.
                assert any(since < t._change_log.deletions_floor for t in shard.tables.values())
                continue
            for chunk in chunks:
                assert chunk.version == shard.version
                assert chunk.rows.ids.shape[0] + chunk.deleted_ids.shape[0] <= chunk_rows
                apply_changes(copy, chunk.table, chunk.rows, chunk.deleted_ids)
            assert copy == now, f"since {since}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(operation.filter(lambda op: op[0] != "export"), max_size=30),
    picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
    max_rows=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_incremental_export_of_a_table_on_its_own(
    ops: list[tuple[Any, ...]], picks: list[int], max_rows: int, seed: int
) -> None:
    """The same property for a table used on its own (one caller, versions in order)."""
    rng = np.random.default_rng(seed)
    with small_limits():
        table = EmbeddingTable(TABLES[0], initial_capacity=8)
        copies = {0: table_rows(table)}
        version = 0
        for op in ops:
            version += 1
            ids = np.unique(np.array(op[2] if op[0] != "push" else op[1], np.int64)) if op[0] != "expire" else None
            if op[0] == "train":
                table.lookup_train(ids, None, float(op[3]), version)
            elif op[0] == "push":
                table.apply_gradients(ids, rng.normal(0, 1, (ids.shape[0], 3)).astype(np.float32), float(op[3]), version)
            elif op[0] == "import":
                values = rng.normal(0, 1, (ids.shape[0], table.width)).astype(np.float32)
                table.upsert(RowBatch(ids, values, np.full(ids.shape[0], op[3], np.uint32)), version)
            elif op[0] == "delete":
                table.delete(ids, version)
            else:
                table.expire(version, None if op[1] is None else float(op[1]))
            copies[version] = table_rows(table)
        now = table_rows(table)
        for pick in picks:
            since = pick % (version + 1)
            copy = dict(copies[since])
            try:
                deleted = table.deleted_since(since)
            except LookupError:
                assert since < table._change_log.deletions_floor
                continue
            apply_changes({"t": copy}, "t", RowBatch(np.zeros(0, np.int64), np.zeros((0, 6), np.float32),
                                                     np.zeros(0, np.uint32)), deleted)  # fmt: skip
            for batch in table.export(since, True, max_rows):
                assert batch.ids.shape[0] <= max_rows
                apply_changes({"t": copy}, "t", batch, np.zeros(0, np.int64))
            assert copy == now, f"since {since}"


# ------------------------------------------------------------ cost of change


def test_incremental_export_reads_only_the_changes() -> None:
    table = EmbeddingTable(TABLES[0], initial_capacity=8)
    table.lookup_train(np.arange(50_000), None, 1000.0, 1)
    changed = np.arange(0, 50_000, 5_000)
    table.apply_gradients(changed, np.ones((10, 3), np.float32), 1001.0, 2)
    table.delete(np.array([7, 8]), 3)

    assert table.change_count(2) == 2  # the two deletions, nothing else
    assert table.change_count(1) == 10 + 2
    rows = np.concatenate([b.ids for b in table.export(1, False, 4)])
    np.testing.assert_array_equal(np.sort(rows), changed)
    np.testing.assert_array_equal(np.sort(table.deleted_since(1)), [7, 8])


def test_change_log_is_compacted_to_the_live_rows_and_exports_stay_exact() -> None:
    with mock.patch.object(change_log_module, "LOG_SLACK", 16):
        table = EmbeddingTable(TABLES[0], initial_capacity=8)
        table.lookup_train(np.arange(100), None, 1000.0, 1)
        for version in range(2, 40):
            table.apply_gradients(np.arange(10), np.ones((10, 3), np.float32), 1000.0 + version, version)
        table.apply_gradients(np.arange(10, 20), np.ones((10, 3), np.float32), 1100.0, 40)

        # 100 creations + 390 updates, compacted whenever over 2 x 100 + 16 entries.
        assert table.change_count(0) <= 2 * 100 + 16 + 10
        assert table.change_count(39) <= 10 + 10  # at most one compacted pass re-counts
        rows = np.concatenate([b.ids for b in table.export(39, False, 1000)])
        np.testing.assert_array_equal(np.sort(rows), np.arange(10, 20))
        assert np.unique(np.concatenate([b.ids for b in table.export(0, False, 1000)])).shape[0] == 100


def test_compaction_moves_marks_with_the_entries_they_point_at() -> None:
    with mock.patch.object(change_log_module, "LOG_SLACK", 0):
        table = EmbeddingTable(TABLES[0], initial_capacity=8)
        ids = np.arange(10, dtype=np.int64)
        table.lookup_train(ids, None, 1000.0, 1)
        table.apply_gradients(ids, np.ones((10, 3), np.float32), 1001.0, 2)
        table.apply_gradients(np.array([3]), np.ones((1, 3), np.float32), 1002.0, 3)  # mark 2 before it
        # 21 entries for 10 live rows: the next mutation compacts to one entry per row,
        # id 3's (version 3) last, and moves mark 2 to just before it.
        table.apply_gradients(np.array([5]), np.ones((1, 3), np.float32), 1003.0, 4)

        assert table.change_count(0) == 11
        assert sorted(int(i) for b in table.export(2, False, 100) for i in b.ids) == [3, 5]
        assert table.change_count(2) == 2


def test_mutations_arriving_out_of_version_order_are_never_missed() -> None:
    """Concurrent mutations may reach a table out of version order (5 before 4): a mark is
    only ever placed at the newest version seen, so everything before it is older."""
    table = EmbeddingTable(TABLES[0], initial_capacity=8)
    table.lookup_train(np.arange(20), None, 1000.0, 1)
    table.apply_gradients(np.array([1]), np.ones((1, 3), np.float32), 1001.0, 5)
    table.apply_gradients(np.array([2]), np.ones((1, 3), np.float32), 1001.0, 4)
    table.apply_gradients(np.array([3]), np.ones((1, 3), np.float32), 1001.0, 6)

    def exported(since: int) -> list[int]:
        return sorted(int(i) for b in table.export(since, False, 100) for i in b.ids)

    assert exported(1) == [1, 2, 3]
    assert exported(3) == [1, 2, 3]  # no mark between 1 and 5: version 4 and 5 are resent
    assert exported(5) == [3]  # the mark at 5 was placed before version 6 arrived
    assert exported(6) == []


def test_marks_stay_exact_when_old_deletions_are_forgotten() -> None:
    with mock.patch.object(change_log_module, "MAX_DELETION_LOG", 10):
        table = EmbeddingTable(TABLES[0], initial_capacity=8)
        table.lookup_train(np.arange(100), None, 1000.0, 1)
        for version in range(2, 9):  # 7 deletions before mark 8 (placed when version 9 arrives)
            table.delete(np.array([version]), version)
        for version in range(9, 14):  # 5 after it: the log overflows and forgets the oldest 3
            table.delete(np.array([version]), version)

        assert table.deleted_since(8).tolist() == list(range(9, 14))
        assert table.deleted_since(11).tolist() == [12, 13]
        with pytest.raises(LookupError, match="full export"):
            table.deleted_since(3)


def test_thinned_marks_only_make_exports_resend_more() -> None:
    with mock.patch.object(change_log_module, "MAX_MARKS", 4):
        table = EmbeddingTable(TABLES[0], initial_capacity=8)
        for version in range(1, 13):  # id v is created at version v, with a mark before it
            table.lookup_train(np.array([version]), None, 1000.0, version)

        exported = {since: [int(i) for b in table.export(since, False, 100) for i in b.ids] for since in range(13)}

        for since in range(13):
            assert set(exported[since]) >= set(range(since + 1, 13)), since  # never misses a change
        assert exported[12] == [] and exported[11] == [12]  # the newest marks are kept exactly
        assert len(exported[2]) > 9  # mark 2 was thinned out: since 2 starts at mark 1, resending id 2


def test_imported_update_times_never_mark_a_row_free() -> None:
    table = EmbeddingTable(TABLES[0], initial_capacity=8)
    batch = RowBatch(np.array([5], np.int64), np.ones((1, 3), np.float32), np.array([2**32 - 1], np.uint32))

    table.upsert(batch, 1)

    assert table.contains(np.array([5]))[0] and len(table) == 1
    assert table_rows(table)[5][1] == 2**32 - 2


# ---------------------------------------------------------------- windowed expiry


def stale_table(rows: int) -> EmbeddingTable:
    """`rows` rows at time 1000 and one fresh row at 2000 (the data clock)."""
    table = EmbeddingTable(TABLES[0], initial_capacity=8)
    table.lookup_train(np.arange(rows), None, 1000.0, 1)
    table.lookup_train(np.array([10**9]), None, 2000.0, 2)
    return table


def test_expiry_runs_in_bounded_windows_each_with_its_own_version() -> None:
    table = stale_table(100)
    windows: list[int] = []

    @contextlib.contextmanager
    def window() -> Iterator[int]:
        version = 10 + len(windows)
        windows.append(version)
        yield version

    with mock.patch.multiple(table_module, EXPIRY_WINDOW_ROWS=16, EXPIRY_WINDOW_EVICTIONS=6):
        evicted = table.expire_in_windows(None, window)

    assert evicted == 100 and len(table) == 1
    assert len(windows) == 17  # 6 rows each (the stale rows are contiguous), 4 in the last
    # Each window's deletions carry its own version: a consumer at any window gets the rest.
    assert [table.deleted_since(v).shape[0] for v in windows] == [max(0, 100 - 6 * (i + 1)) for i in range(17)]
    assert np.sort(table.deleted_since(9)).tolist() == list(range(100))


def test_expiry_skips_stretches_with_nothing_to_expire() -> None:
    table = EmbeddingTable(TABLES[0], initial_capacity=8)
    table.lookup_train(np.arange(10_000), None, 2000.0, 1)
    table.lookup_train(np.array([10**9]), None, 1000.0, 2)  # one stale row, at the end
    windows: list[int] = []

    @contextlib.contextmanager
    def window() -> Iterator[int]:
        windows.append(3)
        yield 3

    assert table.expire_in_windows(None, window) == 1
    assert windows == [3]  # one window: the read-locked search found the only stale row
    assert table.expire_in_windows(None, window) == 0 and windows == [3]


def test_lookups_run_between_expiry_windows() -> None:
    table = stale_table(50)
    fresh = np.array([10**9])
    expected = table.lookup(fresh)
    looked_up: list[bool] = []

    @contextlib.contextmanager
    def window() -> Iterator[int]:
        # Another thread's lookup completes here: no lock is held between windows.
        reader = threading.Thread(target=lambda: looked_up.append(bool((table.lookup(fresh) == expected).all())))
        reader.start()
        reader.join(timeout=DEADLINE)
        assert not reader.is_alive(), "a lookup waited for the sweep"
        yield 5

    with mock.patch.multiple(table_module, EXPIRY_WINDOW_ROWS=8, EXPIRY_WINDOW_EVICTIONS=4):
        assert table.expire_in_windows(None, window) == 50

    assert len(looked_up) >= 50 // 4 and all(looked_up)


def test_shard_expiry_takes_a_version_per_window() -> None:
    shard = EmbeddingShard(ShardConfig(shard=0, num_shards=1, role="training", tables=TABLES))
    shard.lookup([("user", np.arange(40, dtype=np.int64), None)], True, 1000.0)
    shard.lookup([("user", np.array([10**9]), None)], True, 2000.0)
    version = shard.version
    with mock.patch.multiple(table_module, EXPIRY_WINDOW_ROWS=8, EXPIRY_WINDOW_EVICTIONS=5):
        assert shard.expire() == {"user": 40, "item": 0}
    assert shard.version == version + 40 // 5
    chunks = list(shard.export(version + 3, False))
    assert sum(c.deleted_ids.shape[0] for c in chunks) == 40 - 3 * 5


# ------------------------------------------------- a push is seen whole or not at all


def sgd_tables() -> tuple[TableConfig, ...]:
    sgd = OptimizerConfig(kind="sgd", learning_rate=1.0)
    zeros = InitializerConfig(kind="zeros", scale=0.0)
    return tuple(TableConfig(name=name, dim=2, optimizer=sgd, initializer=zeros) for name in ("a", "b", "c"))


def test_an_export_holds_a_push_to_several_entriesentirely_or_not_at_all() -> None:
    shard = EmbeddingShard(ShardConfig(shard=0, num_shards=1, role="training", tables=sgd_tables()))
    ids = np.arange(5, dtype=np.int64)
    shard.lookup([(name, ids, None) for name in ("a", "b", "c")], True, 1000.0)
    since = shard.version
    push = [(name, ids, -np.ones((5, 2), np.float32)) for name in ("a", "b", "c")]
    # The push stops after table "a" until the exporter is waiting for it.
    halfway, resume = threading.Event(), threading.Event()
    original = shard.tables["b"].apply_gradients

    def paused(*args: Any) -> tuple[int, int]:
        halfway.set()
        assert resume.wait(DEADLINE)
        return original(*args)

    chunks: list[Any] = []
    with mock.patch.object(shard.tables["b"], "apply_gradients", paused):
        pusher = threading.Thread(target=shard.apply_gradients, args=(push, 1001.0))
        pusher.start()
        assert halfway.wait(DEADLINE)
        exporter = threading.Thread(target=lambda: chunks.extend(shard.export(since, False)))
        exporter.start()
        wait_for(lambda: shard._gate.waiting_writers == 1 or not exporter.is_alive(), "the exporter", timeout=DEADLINE,
                 interval=0.001)
        resume.set()
        pusher.join(DEADLINE)
        exporter.join(DEADLINE)

    assert not pusher.is_alive() and not exporter.is_alive()
    rows = {c.table: c.rows for c in chunks if c.rows.ids.shape[0]}
    assert sorted(rows) == ["a", "b", "c"], "the export saw part of the push"
    for batch in rows.values():
        np.testing.assert_array_equal(batch.values, np.ones((5, 2), np.float32))
    assert chunks[0].version == shard.version


def test_serving_lookups_never_see_half_of_a_synced_push() -> None:
    training = EmbeddingShard(ShardConfig(shard=0, num_shards=1, role="training", tables=sgd_tables()))
    serving = EmbeddingShard(ShardConfig(shard=0, num_shards=1, role="serving", tables=sgd_tables()))
    ids = np.arange(64, dtype=np.int64)
    names = ("a", "b", "c")
    training.lookup([(name, ids, None) for name in names], True, 1000.0)
    for chunk in training.export(0, False):
        serving.apply_synced_chunk(chunk.table, chunk.rows, chunk.deleted_ids)
    version = training.version
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def follow() -> None:
        # Each push adds 1 to every element of every table; each sync applies one export.
        nonlocal version
        try:
            for _ in range(200):
                training.apply_gradients([(name, ids, -np.ones((64, 2), np.float32)) for name in names], 1001.0)
                chunks = list(training.export(version, False, 16))
                serving.apply_synced_chunks([(c.table, c.rows, c.deleted_ids, "") for c in chunks])
                version = chunks[0].version
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            stop.set()

    follower = threading.Thread(target=follow)
    follower.start()
    while not stop.is_set():
        values = serving.lookup([(name, ids, None) for name in names], False)
        first = values[0][0, 0]
        for out in values:
            assert (out == first).all(), "a lookup saw part of a synced push"
        reads[0] += 1
    follower.join(DEADLINE)

    assert not errors, errors
    assert reads[0] > 0
    np.testing.assert_array_equal(serving.lookup([("a", ids, None)], False)[0], np.full((64, 2), 200.0))


def test_a_large_incremental_export_streams_and_stays_exact() -> None:
    shard = EmbeddingShard(ShardConfig(shard=0, num_shards=1, role="training", tables=TABLES, export_chunk_rows=4))
    shard.lookup([("user", np.arange(300, dtype=np.int64), None)], True, 1000.0)
    since = shard.version
    copy = shard_state(shard)
    list(shard.export(since, False))  # a mark at `since`
    shard.apply_gradients([("user", np.arange(0, 300, 2), np.ones((150, 3), np.float32))], 1001.0)
    shard.import_chunk("user", RowBatch(np.zeros(0, np.int64), np.zeros((0, 3), np.float32), np.zeros(0, np.uint32)),
                       np.arange(1, 40, 2))  # fmt: skip

    assert shard.tables["user"].change_count(since) > 16 * 4  # more than one atomic export holds
    for chunk in shard.export(since, True, 4):
        apply_changes(copy, chunk.table, chunk.rows, chunk.deleted_ids)

    assert copy == shard_state(shard)


@pytest.mark.parametrize("since", [0, 1])
def test_export_of_an_empty_shard_has_no_chunks(since: int) -> None:
    shard = EmbeddingShard(ShardConfig(shard=0, num_shards=1, role="training", tables=TABLES))

    assert list(shard.export(since, False)) == []
