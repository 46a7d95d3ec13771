"""Model-serving's embedding cache in front of real serving shards: exact, coherent, within its bound.

In this process: serving shards on free ports, changed the way their sync changes them
(`apply_synced_chunks`), and a cache refreshed by hand, so each test decides when the
cache reads the shards' changes. As processes: training shards, serving shards following
them (`--role serving --sync-from`), and a cache with its refresher running, for the
staleness bound end to end and a serving shard's restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers.cluster import Cluster, start_cluster
from helpers.processes import Role
from helpers.waiting import wait_for
from monolith.common.channel import ChannelConfig
from monolith.common.process import free_port, wait_healthy
from monolith.embedding import change_log
from monolith.embedding.config import TableConfig
from monolith.embedding.table import RowBatch
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.serving.embedding_cache import CacheConfig, CachedEmbeddings

TABLES = (TableConfig(name="user", dim=8), TableConfig(name="user/bias", dim=1))
DIMS = {t.name: t.dim for t in TABLES}
NEVER_STALE = 600.0  # a refresh interval whose bound no test reaches: only `refresh()` moves the cache


@pytest.fixture
def serving() -> Iterator[Cluster]:
    """Two serving shards that have synced once (nothing): at version 1.

    A cache takes the version before the shard's current one as its position, so from here
    its position is above 0; one that starts at 0 follows the shard afresh at its next change
    (an export since 0 would list no deletions), as the first test shows.
    """
    cluster = start_cluster(num_shards=2, role="serving", tables=TABLES)
    sync(cluster, np.zeros(0, np.int64))
    yield cluster
    cluster.stop()


def sync(cluster: Cluster, ids: np.ndarray, value: float = 0.0, deleted: np.ndarray | None = None) -> None:
    """Changes the serving shards as their sync would: rows of `ids` (both tables) set to value + id, ids deleted."""
    ids = np.asarray(ids, dtype=np.int64)
    deleted = np.zeros(0, np.int64) if deleted is None else np.asarray(deleted, dtype=np.int64)
    now = np.uint32(time.time())
    for shard in range(len(cluster.shards)):
        chunks = []
        for name, dim in DIMS.items():
            mine, gone = ids[cluster.owners(name, ids) == shard], deleted[cluster.owners(name, deleted) == shard]
            values = np.repeat((value + mine).astype(np.float32)[:, None], dim, axis=1)
            chunks.append((name, RowBatch(mine, values, np.full(mine.shape[0], now)), gone, "test"))
        cluster.shards[shard].apply_synced_chunks(chunks)


def request(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.asarray(ids, dtype=np.int64) for name in DIMS}


def assert_same(answer: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert answer.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(answer[name], expected[name], err_msg=name)


def make_cache(cluster: Cluster, refresh: float = NEVER_STALE, budget: int = 1 << 20, prefill: str = "off",
               shards: object = None) -> CachedEmbeddings:  # fmt: skip
    config = CacheConfig(bytes=budget, refresh_seconds=refresh, prefill=prefill)
    return CachedEmbeddings(shards or cluster.client, DIMS, config)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- in this process


def test_hits_and_misses_answer_exactly_what_the_shards_answer(serving: Cluster) -> None:
    rng = np.random.default_rng(7)
    cache = make_cache(serving)
    cache.refresh()  # position 0: followed afresh at the next change
    sync(serving, np.arange(300), value=1.0)
    cache.refresh()

    for round_ in range(30):
        # Repeats, absent ids (zeros) and negative ids; now and then a change, deletions, a refresh.
        ids = rng.integers(-20, 400, size=rng.integers(1, 200))
        assert_same(cache.lookup(request(ids)), serving.client.lookup(request(ids)))
        if round_ % 5 == 4:
            changed = rng.integers(-20, 400, size=50)
            sync(serving, changed, value=100.0 * round_, deleted=rng.integers(-20, 400, size=10))
            cache.refresh()

    stats = cache.stats()
    assert stats.hits > 0 and stats.misses > 0, stats
    assert stats.refused == 0 and stats.invalidations == 0, stats


def test_the_feed_overwrites_changed_rows_and_drops_deleted_ones(serving: Cluster) -> None:
    sync(serving, np.arange(100), value=1.0)
    cache = make_cache(serving)
    cache.refresh()
    ids = request(np.arange(150))  # 100..149 are absent: cached as zeros
    first = cache.lookup(ids)
    assert_same(cache.lookup(ids), first)
    assert cache.stats().hits == 300

    sync(serving, np.concatenate([np.arange(10), np.arange(120, 130)]), value=50.0, deleted=np.arange(10, 20))
    assert_same(cache.lookup(ids), first)  # cached: the change is not read yet
    cache.refresh()

    after = cache.lookup(ids)
    assert_same(after, serving.client.lookup(ids))
    assert (after["user"][120:130, 0] == 50.0 + np.arange(120, 130)).all()  # absent ids that got a row
    assert (after["user"][10:20] == 0).all()  # deleted
    assert cache.stats().misses == 300 + 20  # the deleted ids were dropped and fetched again


def test_no_cached_row_is_answered_past_the_staleness_bound(serving: Cluster) -> None:
    sync(serving, np.arange(50), value=1.0)
    cache = make_cache(serving, refresh=0.2)  # bound: 0.4 s; the refresher is not started
    assert cache.config.max_staleness == pytest.approx(0.4)
    cache.refresh()
    refreshed = time.monotonic()  # after the refresh began: its bound ends before `refreshed` + 0.4
    ids = request(np.arange(50))
    cache.lookup(ids)
    sync(serving, np.arange(50), value=9.0)

    wait_for(lambda: time.monotonic() - refreshed > cache.config.max_staleness, "the bound to pass", interval=0.01)
    misses = cache.stats().misses

    assert_same(cache.lookup(ids), serving.client.lookup(ids))
    assert cache.stats().misses == misses + 100


class _RefreshMidway:
    """The serving shards' client, with a change synced and a refresh run between a miss's lookup and its insert."""

    def __init__(self, cluster: Cluster, changed: np.ndarray) -> None:
        self._cluster = cluster
        self._changed = changed
        self.cache: CachedEmbeddings | None = None
        self.num_shards = cluster.client.num_shards
        self.shard = cluster.client.shard

    def lookup(self, features: dict[str, np.ndarray], training: bool = False,
               timeout: float | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        answer = self._cluster.client.lookup(features, training=training, timeout=timeout)
        sync(self._cluster, self._changed, value=77.0)
        assert self.cache is not None
        self.cache.refresh()
        return answer


def test_a_miss_that_raced_a_refresh_is_answered_but_not_cached(serving: Cluster) -> None:
    sync(serving, np.arange(20), value=1.0)
    changed = np.arange(5)
    assert set(serving.owners("user", changed)) == set(serving.owners("user/bias", changed)) == {0, 1}
    midway = _RefreshMidway(serving, changed)
    cache = make_cache(serving, shards=midway)
    midway.cache = cache
    cache.refresh()
    ids = request(np.arange(20))

    answered = cache.lookup(ids)  # read before the change, applied by the refresh before the insert

    assert (answered["user"][:5, 0] == 1.0 + changed).all()
    # Had the miss been inserted, the rows read before the change would be served now.
    assert (cache.lookup(ids)["user"][:5, 0] == 77.0 + changed).all()
    assert_same(cache.lookup(ids), serving.client.lookup(ids))
    assert cache.stats().refused == 40  # both shards' changes were applied meanwhile


def test_a_shard_that_forgot_the_deletions_since_the_position_is_followed_afresh(
    serving: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(change_log, "MAX_DELETION_LOG", 8)  # deletions remembered per table
    sync(serving, np.arange(200), value=1.0)
    cache = make_cache(serving)
    cache.refresh()
    ids = request(np.arange(200))
    cache.lookup(ids)
    assert cache.cached_from(0) > 0 and cache.cached_from(1) > 0

    for start in range(0, 100, 10):  # ten syncs deleting ten ids each: the oldest are forgotten
        sync(serving, np.zeros(0, np.int64), deleted=np.arange(start, start + 10))
    cache.refresh()

    assert cache.stats().invalidations == 2  # both shards
    assert cache.cached_from(0) == cache.cached_from(1) == 0
    assert_same(cache.lookup(ids), serving.client.lookup(ids))
    assert_same(cache.lookup(ids), serving.client.lookup(ids))
    assert cache.stats().hits >= 400


def test_a_model_that_fits_is_cached_whole_and_kept_whole(serving: Cluster) -> None:
    sync(serving, np.arange(1000), value=1.0)
    cache = make_cache(serving, budget=1 << 20, prefill="auto")
    cache.refresh()

    assert cache.stats().rows == 2000
    ids = request(np.arange(1000))
    assert_same(cache.lookup(ids), serving.client.lookup(ids))
    assert cache.stats().misses == 0

    sync(serving, np.arange(1000, 1100), value=2.0)  # new rows: the feed adds them while they fit
    cache.refresh()
    more = request(np.arange(1000, 1100))
    assert_same(cache.lookup(more), serving.client.lookup(more))
    assert cache.stats().misses == 0

    too_small = make_cache(serving, budget=32 * 1024, prefill="auto")
    too_small.refresh()
    assert too_small.stats().rows == 0  # 1100 rows do not fit in 32 KiB: nothing copied


def test_eviction_keeps_the_cache_within_its_bytes_and_exact(serving: Cluster) -> None:
    sync(serving, np.arange(5000), value=1.0)
    budget = 48 * 1024
    cache = make_cache(serving, budget=budget)
    cache.refresh()
    rng = np.random.default_rng(3)

    for _ in range(40):
        ids = request(rng.integers(0, 6000, size=300))
        assert_same(cache.lookup(ids), serving.client.lookup(ids))
        assert cache.stats().bytes <= budget

    stats = cache.stats()
    assert stats.evictions > 0 and stats.rows > 0, stats


# ---------------------------------------------------------------------- processes

CONFIG = """\
features:
  - name: user
    dim: 8
    optimizer: {kind: sgd, learning_rate: 0.5}
"""
SHARDS = 2
SYNC_INTERVAL = 0.25  # serving shards' --sync-interval
REFRESH = 0.25  # the cache's refresh interval
# Each of the two periodic tasks picks a change up at most one interval after it lands
# (SYNC_INTERVAL, REFRESH); then each does its work (a Stats and an Export round trip and
# an apply of a few rows: ~5 ms each here), and the test sees it at its next poll (10 ms).
# 0.15 s covers that work, the poll, and the wake-up delay of the two threads on a busy
# 2-core machine; it is not a margin on the intervals themselves.
ALLOWANCE = 0.15


class Shards:
    """Training shard processes, and serving shard processes following them."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "model.yaml").write_text(CONFIG)
        self._tmp = tmp_path
        self.training = [f"127.0.0.1:{free_port()}" for _ in range(SHARDS)]
        self.serving = [f"127.0.0.1:{free_port()}" for _ in range(SHARDS)]
        self.roles: dict[str, Role] = {}
        for i in range(SHARDS):
            self.start(f"training-{i}")
        for i in range(SHARDS):
            self.start(f"serving-{i}")
        for address in (*self.training, *self.serving):
            wait_healthy(address, timeout=60)
        # Fast reconnects: a restarted serving shard is reached again at once.
        channel = ChannelConfig(fast_reconnect=True)
        self.train_client = ShardedEmbeddingClient(self.training, {"user": 8}, timeout=10, channel=channel)
        self.serve_client = ShardedEmbeddingClient(self.serving, {"user": 8}, timeout=10, channel=channel)

    def start(self, name: str) -> None:
        role, index = name.split("-")
        i = int(index)
        address = (self.training if role == "training" else self.serving)[i]
        args = ["embedding-ps", "--shard", index, "--num-shards", str(SHARDS), "--role", role,
                "--config", str(self._tmp / "model.yaml"), "--host", "127.0.0.1",
                "--port", address.rsplit(":", 1)[1], "--metrics-port", "0"]  # fmt: skip
        if role == "serving":
            args += ["--sync-from", self.training[i], "--sync-interval", str(SYNC_INTERVAL)]
        self.roles[name] = Role(self._tmp, name, args)

    def restart(self, name: str) -> None:
        self.roles[name].stop()
        self.start(name)
        index = int(name.split("-")[1])
        wait_healthy(self.serving[index] if name.startswith("serving") else self.training[index], timeout=60)

    def trained(self, ids: np.ndarray) -> np.ndarray:
        """The training shards' rows of `ids` (a read-only lookup)."""
        return self.train_client.lookup({"user": ids})["user"]

    def stop(self) -> None:
        self.train_client.close()
        self.serve_client.close()
        for name in sorted(self.roles, reverse=True):  # followers first
            self.roles[name].stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shards]:
    made = Shards(tmp_path_factory.mktemp("cache-shards"))
    ids = np.arange(400, dtype=np.int64)
    made.train_client.lookup({"user": ids}, training=True, update_time=time.time())  # creates the rows
    yield made
    made.stop()


def _served_as_trained(cache: CachedEmbeddings, shards: Shards, ids: np.ndarray) -> bool:
    return bool(np.array_equal(cache.lookup({"user": ids})["user"], shards.trained(ids)))


def test_a_row_trained_is_served_through_the_cache_within_the_sync_and_refresh_intervals(shards: Shards) -> None:
    cache = CachedEmbeddings(shards.serve_client, {"user": 8}, CacheConfig(bytes=1 << 20, refresh_seconds=REFRESH))
    cache.start()
    try:
        ids = np.arange(400, dtype=np.int64)
        wait_for(lambda: _served_as_trained(cache, shards, ids), "the cache to serve the trained rows", timeout=30)
        lags = []
        for step in range(4):
            row = ids[step * 7 : step * 7 + 1]
            before = shards.trained(row)
            shards.train_client.apply_gradients({"user": (row, np.ones((1, 8), np.float32))}, update_time=time.time())
            changed = time.monotonic()
            after = shards.trained(row)
            assert not np.array_equal(before, after)
            wait_for(lambda: np.array_equal(cache.lookup({"user": row})["user"], after),
                     "the cache to serve the new row", timeout=10, interval=0.01)  # fmt: skip
            lags.append(time.monotonic() - changed)
            assert cache.lookup({"user": ids})["user"].shape == (400, 8)  # the others keep being hits

        assert max(lags) <= SYNC_INTERVAL + REFRESH + ALLOWANCE, lags
        assert cache.stats().hits > 0
    finally:
        cache.close()


def test_a_restarted_serving_shard_drops_what_was_cached_from_it(shards: Shards) -> None:
    cache = CachedEmbeddings(shards.serve_client, {"user": 8}, CacheConfig(bytes=1 << 20, refresh_seconds=NEVER_STALE,
                                                                           prefill="off"))  # fmt: skip
    ids = np.arange(400, dtype=np.int64)
    wait_for(lambda: _served_as_trained(cache, shards, ids), "the serving shards to hold the trained rows", timeout=30)
    cache.refresh()
    cache.lookup({"user": ids})
    held = [cache.cached_from(0), cache.cached_from(1)]
    assert min(held) > 0, held

    shards.restart("serving-0")  # a new incarnation: empty, then a full copy from training
    cache.refresh()

    assert cache.stats().invalidations == 1
    assert [cache.cached_from(0), cache.cached_from(1)] == [0, held[1]]
    # What the restarted shard answers (zeros at first, then its copy) is what is served.
    wait_for(lambda: _served_as_trained(cache, shards, ids), "the cache to serve the restarted shard's copy of the "
             "trained rows", timeout=30, step=cache.refresh)  # fmt: skip
    assert_same(cache.lookup({"user": ids}), shards.serve_client.lookup({"user": ids}))
