"""ServingSync against a real in-process training server: full copy, increments, expiry,
restarts on either side, outages, freshness."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from helpers.metrics import registry_value
from helpers.sync import sync_until
from helpers.waiting import wait_for
from monolith.common.server import MonolithServer, ServerConfig
from monolith.embedding import change_log
from monolith.embedding.config import AdmissionConfig, OptimizerConfig, TableConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps import shard as shard_module
from monolith.embedding_ps.routing import route_to_shards
from monolith.embedding_ps.service import build_embedding_ps
from monolith.embedding_ps.chunks import Chunk
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig
from monolith.embedding_ps.sync import ServingSync, SyncError

TABLES = (
    TableConfig(name="user", dim=4, optimizer=OptimizerConfig(kind="adagrad"), admission=AdmissionConfig(filter="counting", threshold=2)),
    TableConfig(name="item", dim=3, optimizer=OptimizerConfig(kind="sgd", learning_rate=0.5)),
    TableConfig(name="tag", dim=2, expire_after=100.0),
)
NUM_SHARDS = 2


def ids_for(name: str, n: int, offset: int = 0, shard: int = 0) -> np.ndarray:
    """n distinct ids of `name` >= offset that route to `shard`."""
    candidates = np.arange(offset, offset + 8 * n + 64, dtype=np.int64)
    chosen = candidates[route_to_shards(candidates, stable_hash64(name), NUM_SHARDS) == shard][:n]
    assert chosen.shape[0] == n
    return chosen


USERS, ITEMS, TAGS = ids_for("user", 20), ids_for("item", 30), ids_for("tag", 10)


def make_shard(role: str, shard: int = 0) -> EmbeddingShard:
    return EmbeddingShard(ShardConfig(shard=shard, num_shards=NUM_SHARDS, role=role, tables=TABLES, export_chunk_rows=7))


def rows_of(shard: EmbeddingShard, name: str) -> tuple[list[int], bytes, list[int]]:
    """Every row of a table sorted by id: (ids, embedding bytes, update times)."""
    batches = list(shard.tables[name].export(0, False, 1 << 20))
    if not batches:
        return [], b"", []
    ids = np.concatenate([b.ids for b in batches])
    order = np.argsort(ids)
    values = np.concatenate([b.values for b in batches])[order]
    times = np.concatenate([b.update_times for b in batches])[order]
    return ids[order].tolist(), values.tobytes(), times.tolist()


def assert_mirrors(serving: EmbeddingShard, training: EmbeddingShard) -> None:
    """Row for row the same embeddings and update times, and the same serving lookups."""
    for name in training.tables:
        assert rows_of(serving, name) == rows_of(training, name), name
    probe = [("user", USERS, None), ("item", ITEMS, None), ("tag", TAGS, None)]
    for (name, _, _), a, b in zip(probe, training.lookup(probe, False), serving.lookup(probe, False)):
        np.testing.assert_array_equal(b, a, err_msg=name)


def train(shard: EmbeddingShard, when: float, users: np.ndarray = USERS, items: np.ndarray = ITEMS,
          tags: np.ndarray = TAGS) -> None:  # fmt: skip
    """Creates rows (users need two sightings; the first five are seen once and stay pending) and updates some."""
    counts = np.array([1] * 5 + [2] * (users.shape[0] - 5), np.int32)
    shard.lookup([("user", users, counts), ("item", items, None), ("tag", tags, None)], True, when)
    shard.apply_gradients([("item", items[:5], np.ones((5, 3), np.float32))], when)


class TrainingServers:
    """Training shards served in this process; a restart keeps the port."""

    def __init__(self) -> None:
        self.servers: list[MonolithServer] = []
        self.shard = make_shard("training")
        self.port = 0
        self.serve(self.shard)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serve(self, shard: EmbeddingShard) -> None:
        server = build_embedding_ps(shard, ServerConfig(host="127.0.0.1", port=self.port, metrics_port=None))
        server.start()
        self.servers.append(server)
        self.shard, self.port = shard, server.port

    def down(self) -> None:
        self.servers[-1].stop(grace=0)

    def restart(self, shard: EmbeddingShard | None = None) -> EmbeddingShard:
        """Stops the running server and serves `shard` (default: a new, empty one) on the same port."""
        self.down()
        self.serve(shard or make_shard("training"))
        return self.shard


@pytest.fixture
def training() -> Iterator[TrainingServers]:
    servers = TrainingServers()
    yield servers
    for server in servers.servers:
        server.stop(grace=0)


@pytest.fixture
def follow() -> Iterator[Callable[..., tuple[EmbeddingShard, ServingSync]]]:
    """Makes (serving shard, ServingSync) pairs; stops them after the test."""
    started: list[ServingSync] = []

    def make(address: str, shard: int = 0, **kwargs: Any) -> tuple[EmbeddingShard, ServingSync]:
        serving = make_shard("serving", shard)
        started.append(ServingSync(serving, address, **kwargs))
        return serving, started[-1]

    yield make
    for sync in started:
        sync.stop()


def metric(name: str) -> float:
    return registry_value(name, shard="0")


def test_first_sync_copies_the_training_shard_in_full(training: TrainingServers, follow: Callable[..., Any]) -> None:
    train(training.shard, 1000.0)
    serving, sync = follow(training.address)
    full_before = metric("monolith_sync_full_resyncs_total")

    result = sync.sync_once()

    assert result.ok and result.full_resync, result.error
    assert result.rows == 15 + 30 + 10  # five users were seen once: pending, not synced
    assert result.acknowledged == sync.acknowledged == (training.shard.incarnation, training.shard.version)
    assert sync.last_result is result
    assert_mirrors(serving, training.shard)
    assert metric("monolith_sync_full_resyncs_total") == full_before + 1
    assert metric("monolith_sync_version") == training.shard.version


def test_later_syncs_carry_only_the_changes(training: TrainingServers, follow: Callable[..., Any]) -> None:
    train(training.shard, 1000.0)
    serving, sync = follow(training.address)
    sync.sync_once()
    new_items = ids_for("item", 4, offset=10_000)
    training.shard.lookup([("item", new_items, None)], True, 1100.0)
    training.shard.apply_gradients([("user", USERS[5:8], np.full((3, 4), 0.5, np.float32))], 1100.0)

    result = sync.sync_once()
    idle = sync.sync_once()

    assert result.ok and not result.full_resync
    assert result.rows == 4 + 3
    assert_mirrors(serving, training.shard)
    assert idle.ok and (idle.rows, idle.deletions, idle.full_resync) == (0, 0, False)
    assert idle.acknowledged == (training.shard.incarnation, training.shard.version)


def test_an_incremental_sync_is_applied_as_one_unit(
    training: TrainingServers, follow: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small bounds, so the test can also build an export too large to copy at one instant.
    monkeypatch.setattr(shard_module, "ATOMIC_EXPORT_ENTRIES", 100)
    train(training.shard, 1000.0)
    serving, sync = follow(training.address)
    monkeypatch.setattr(sync, "_unit_rows", 100)
    sync.sync_once()
    units: list[list[str]] = []
    apply = serving.apply_synced_chunks

    def recorded(chunks: list[Any]) -> tuple[int, int]:
        units.append(sorted({name for name, *_ in chunks}))
        return apply(chunks)

    monkeypatch.setattr(serving, "apply_synced_chunks", recorded)
    # One training step over two tables: several chunks of 7 rows, one unit on serving,
    # so a serving lookup sees all of the step or none of it.
    training.shard.apply_gradients(
        [("user", USERS[5:15], np.ones((10, 4), np.float32)), ("item", ITEMS[:12], np.ones((12, 3), np.float32))],
        1100.0,
    )

    result = sync.sync_once()

    assert result.ok and not result.full_resync and result.rows == 10 + 12
    assert units == [["item", "user"]]
    assert_mirrors(serving, training.shard)

    # An export too large to copy at one instant (over 100 entries) comes in several units.
    training.shard.lookup([("item", ids_for("item", 150, offset=20_000), None)], True, 1200.0)
    units.clear()

    result = sync.sync_once()

    assert result.ok and result.rows == 150 and len(units) > 1
    assert_mirrors(serving, training.shard)


def test_expired_rows_disappear_from_serving(training: TrainingServers, follow: Callable[..., Any]) -> None:
    train(training.shard, 1000.0)
    fresh_tags = ids_for("tag", 3, offset=10_000)
    training.shard.lookup([("tag", fresh_tags, None)], True, 1200.0)
    serving, sync = follow(training.address)
    sync.sync_once()
    assert serving.tables["tag"].contains(TAGS).all()

    evicted = training.shard.expire(now=1150.0)
    result = sync.sync_once()

    assert evicted["tag"] == TAGS.shape[0]
    assert result.ok and not result.full_resync and result.deletions == TAGS.shape[0]
    assert not serving.tables["tag"].contains(TAGS).any()
    assert serving.tables["tag"].contains(fresh_tags).all()
    assert_mirrors(serving, training.shard)


def test_forgotten_deletions_fall_back_to_a_full_copy(
    training: TrainingServers, follow: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(change_log, "MAX_DELETION_LOG", 4)
    train(training.shard, 1000.0)
    serving, sync = follow(training.address)
    sync.sync_once()
    # Two expiry sweeps overflow a log of 4: the first sweep's deletions are forgotten, so
    # "what was deleted since the last sync" can no longer be answered.
    assert training.shard.expire(now=1150.0)["tag"] == 10
    training.shard.lookup([("tag", TAGS[:5], None)], True, 1200.0)
    assert training.shard.expire(now=1350.0)["tag"] == 5

    result = sync.sync_once()

    assert result.ok and result.full_resync, result.error
    assert not serving.tables["tag"].contains(TAGS).any()
    assert_mirrors(serving, training.shard)


def test_a_rolled_back_training_shard_never_shrinks_serving(
    training: TrainingServers, follow: Callable[..., Any]
) -> None:
    train(training.shard, 1000.0)
    serving, sync = follow(training.address)
    sync.sync_once()
    old_incarnation = training.shard.incarnation
    before = {name: rows_of(serving, name) for name in serving.tables}

    restarted = training.restart()
    # Versions restart from 0 and may pass the acknowledged one: only the incarnation tells.
    for _ in range(3):
        train(restarted, 2000.0, users=USERS[:10], items=ITEMS[10:], tags=TAGS[:0])
    assert restarted.version > sync.acknowledged[1]
    result = sync_until(sync)

    # The new incarnation is copied in full; what it lacks (users 10..19, items 0..9, every
    # tag) stays served as it was, and is retained.
    assert restarted.incarnation != old_incarnation
    assert result.ok and result.full_resync and result.deletions == 0, result
    assert sync.acknowledged == (restarted.incarnation, restarted.version)
    assert len(sync.retained) == 15 - 5 + 10 + 10
    assert rows_of(serving, "tag") == before["tag"]
    held_items = dict(zip(rows_of(serving, "item")[0], rows_of(serving, "item")[2]))
    assert set(held_items) == set(ITEMS.tolist())
    assert all(held_items[i] == 2000 for i in ITEMS[10:].tolist())  # the new incarnation's rows

    # Training re-creates items 0..9 and a tag (the replay after the cut): they follow training
    # again. The tag moves the tag table's clock to 2100, so the other tags (last updated at
    # 1000, expire_after 100) expire as training would have expired them.
    restarted.lookup([("item", ITEMS[:10], None), ("tag", TAGS[:1], None)], True, 2100.0)
    result = sync_until(sync)

    assert result.ok and not result.full_resync and result.deletions == 9, result
    assert rows_of(serving, "item") == rows_of(restarted, "item")
    assert rows_of(serving, "tag") == rows_of(restarted, "tag")
    assert sorted(sync.retained.ids("user").tolist()) == sorted(USERS[10:].tolist()) and len(sync.retained) == 10
    users = set(rows_of(serving, "user")[0])
    assert users == set(rows_of(restarted, "user")[0]) | set(USERS[10:].tolist())


def test_restarted_serving_shard_starts_with_a_full_copy(training: TrainingServers, follow: Callable[..., Any]) -> None:
    train(training.shard, 1000.0)
    _, first = follow(training.address)
    first.sync_once()
    training.shard.apply_gradients([("item", ITEMS[:2], np.ones((2, 3), np.float32))], 1100.0)

    serving, second = follow(training.address)  # a new process: remembers nothing
    result = second.sync_once()

    assert result.ok and result.full_resync and result.rows == 55
    assert_mirrors(serving, training.shard)


def test_training_shard_down_keeps_serving_and_resumes_incrementally(
    training: TrainingServers, follow: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    train(training.shard, 1000.0)
    serving, sync = follow(training.address)
    sync.sync_once()
    before = serving.lookup([("item", ITEMS, None)], False)[0]
    failures_before = metric("monolith_sync_failures_total")

    training.down()
    training.shard.apply_gradients([("item", ITEMS[:3], np.ones((3, 3), np.float32))], 1100.0)
    with caplog.at_level(logging.INFO, logger="monolith.embedding_ps.sync"):
        failed = [sync.sync_once() for _ in range(3)]
        during = serving.lookup([("item", ITEMS, None)], False)[0]
        training.serve(training.shard)  # the same process is reachable again
        recovered = sync_until(sync)

    assert [r.ok for r in failed] == [False] * 3
    assert all(r.error.startswith("UNAVAILABLE") for r in failed), failed[0].error
    np.testing.assert_array_equal(during, before)  # stale, but answering
    assert metric("monolith_sync_failures_total") >= failures_before + 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "serving keeps answering" in warnings[0].getMessage()
    assert recovered.ok and not recovered.full_resync and recovered.rows == 3
    assert any("recovered after" in r.getMessage() for r in caplog.records)
    assert_mirrors(serving, training.shard)


def test_sync_lag_is_measured_in_event_time(
    training: TrainingServers, follow: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    serving, sync = follow(training.address)
    assert np.isnan(sync.lag_seconds())  # nothing known before a sync
    sync.sync_once()
    assert sync.newest_update_time == 0 and sync.lag_seconds() == 0  # in step with an empty shard

    # Data from 1997: in step means no lag, however old the data is.
    start = 852_076_800.0
    train(training.shard, start)
    sync.sync_once()
    assert sync.newest_update_time == start and sync.synced_clock == start
    assert sync.lag_seconds() == 0 and metric("monolith_sync_lag_seconds") == 0

    # Training moves 30 s of data time ahead; the serving side sees it (Stats) but cannot copy it.
    training.shard.apply_gradients([("item", ITEMS[:1], np.ones((1, 3), np.float32))], start + 30)
    with monkeypatch.context() as patch:
        patch.setattr(sync._source, "export", _export_cut_off)
        assert not sync.sync_once().ok
    assert sync.source_clock == start + 30 and sync.lag_seconds() == 30
    assert metric("monolith_sync_lag_seconds") == 30

    assert sync.sync_once().ok
    assert sync.newest_update_time == start + 30 and sync.lag_seconds() == 0

    # A training shard restarted on older data: copied in full, so in step again.
    train(training.restart(), start - 50)
    sync_until(sync)
    assert sync.newest_update_time == start - 50 and sync.lag_seconds() == 0


def _export_cut_off(*args: object, **kwargs: object) -> Iterator[Chunk]:
    raise SyncError("the export stream was cut off")


def test_a_shard_of_another_index_is_refused(training: TrainingServers, follow: Callable[..., Any]) -> None:
    train(training.shard, 1000.0)
    serving, sync = follow(training.address, shard=1)

    result = sync.sync_once()

    assert not result.ok and result.acknowledged is None
    assert "is shard 0 of 2; this serving shard is 1 of 2" in result.error
    assert len(serving.tables["item"]) == 0


def test_a_training_restart_during_the_sync_aborts_it(
    training: TrainingServers, follow: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    train(training.shard, 1000.0)
    serving, sync = follow(training.address)
    # Stats answered by the old process, Export by its successor.
    stale = sync._source.stats()
    stale.incarnation = "0" * 32
    monkeypatch.setattr(sync._source, "stats", lambda: stale)

    result = sync.sync_once()

    assert not result.ok and "restarted during the sync" in result.error
    assert len(serving.tables["item"]) == 0 and sync.acknowledged is None


def test_the_thread_keeps_serving_in_step(training: TrainingServers, follow: Callable[..., Any]) -> None:
    serving, sync = follow(training.address, interval=0.05)
    sync.start()
    train(training.shard, 1000.0)
    target = (training.shard.incarnation, training.shard.version)
    wait_for(lambda: sync.acknowledged == target, f"the sync thread to acknowledge {target}", timeout=5, interval=0.02)
    sync.stop()

    assert_mirrors(serving, training.shard)
    with pytest.raises(RuntimeError, match="stopped"):
        sync.sync_once()


def test_only_a_serving_shard_can_follow() -> None:
    with pytest.raises(ValueError, match="needs a serving shard"):
        ServingSync(make_shard("training"), "127.0.0.1:1")
    with pytest.raises(ValueError, match="interval"):
        ServingSync(make_shard("serving"), "127.0.0.1:1", interval=0)
