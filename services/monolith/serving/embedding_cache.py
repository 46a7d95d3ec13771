"""Model-serving's embedding cache: hot rows in process, in front of the serving shards.

After the embedding cache of HugeCTR's hierarchical parameter server: a Predict's lookup
is answered from rows held in this process where it can, and only the ids it lacks go to
the serving embedding-PS shards, in one batched lookup (one RPC per shard). The rows sit
in a `RowCache` bounded in bytes (`--embedding-cache-bytes`), evicting by CLOCK.

Coherence: the same feed the serving shards follow. A serving shard answers
`Export(since_version=V)` with the rows changed and the ids deleted after its own version
V, as its training shard does for it (see `embedding_ps.sync`). Every
`--embedding-cache-refresh` seconds the refresher asks each serving shard for its Stats
(incarnation, version) and, when the version moved past the position the cache follows,
for the export since that position: changed rows that are cached are overwritten (and,
where the cache has free room, changed rows it lacks are added: it never evicts for them),
deleted ids are dropped, and the position moves to the version the export is complete up
to. An export is applied as one unit under the cache's lock, as the shard applies its own
syncs, so hits never see part of one.

Ids a shard lacks read as zeros and are cached as zeros: when the shard later gets a row
for one (synced from training), that is a change after the position, so the feed
overwrites it; when training deletes it, the feed drops it.

A new incarnation of a shard (the process restarted: its versions began again) drops
every row cached from it, as does an export the shard refuses because its deletion log no
longer reaches back to the position, and a copy that fails midway; the cache then follows
the shard afresh. A refresh that merely fails (the shard is unreachable) keeps the rows:
the staleness bound below stops them being answered, and the next refresh of the same
incarnation brings them up to date.

Following afresh, the cache takes its position from the shard's Stats: version v - 1. A
serving shard has a single writer (its sync, or else its expiry sweep), so every mutation
up to v - 1 is applied when Stats reads v, and an export since v - 1 misses none that
follow. When the serving shards' rows all fit in the budget (`--embedding-cache-prefill
auto`), it copies the shard in whole instead (an export since 0), so a model that fits is
cached whole, and the feed then adds every new row while it still fits.

Misses racing the feed. A miss is looked up at the shard and then inserted, but the feed
may have applied a change to that id in between, while it was not cached; inserting the
row read before would undo the change for good. So each shard has an epoch, bumped
whenever its changes are applied or its rows dropped: a miss remembers the epochs before
its lookup and its rows are inserted only for shards whose epoch has not moved (the
others are answered but not cached, and counted as refused). A row inserted that way was
read after the position was reached, so every later change to it is in the next export.
While a shard is being copied or followed afresh its misses are not inserted at all (a
full export lists no deletions).

The staleness bound. Every row the cache holds from a shard equals that shard's copy as
of an instant no earlier than the start of the shard's last successful refresh: the
export's rows are read after it, the rows it did not list had not changed up to its
version, and rows inserted by misses were read after that. A lookup answers from a
shard's rows only while that start is at most `max_staleness` = 2 x
`--embedding-cache-refresh` ago; otherwise its ids go to the shard. So a cached row is
never behind its serving shard's copy by more than one refresh interval plus that
refresh's duration, and never by more than two intervals, however slow or failed the
refreshes are. Relative to the training shard, add the serving shard's own lag: one sync
interval plus one sync's duration. A lookup of several tables may combine hits (as of the
last refresh) with misses (as of now).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import threading
import time
import weakref
from typing import Annotated, Literal, Mapping

import numpy as np
import pydantic

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.common.config import ConfigModel, parse_config, positive_seconds
from monolith.common.errors import ConfigError, FailedPrecondition, MonolithError, describe
from monolith.common.periodic import PeriodicTask
from monolith.embedding.concurrency import ReadWriteLock
from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps.chunks import Chunk
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.embedding_ps.routing import route_to_shards
from monolith.embedding_ps.shard import ATOMIC_EXPORT_ENTRIES
from monolith.model.config import ModelConfig
from monolith.serving.metrics import (
    CACHE_BYTES,
    CACHE_EVICTIONS,
    CACHE_HITS,
    CACHE_INVALIDATIONS,
    CACHE_MISSES,
    CACHE_REFRESH_FAILURES,
    CACHE_REFUSED,
    CACHE_ROWS,
    CACHE_STALENESS,
)
from monolith.serving.row_cache import RowCache, footprint

_LOGGER = logging.getLogger("monolith.serving.embedding_cache")

EXPORT_CHUNK_ROWS = 16_384  # rows per chunk the refresher asks for: a few MiB at most


class CacheConfig(ConfigModel):
    """The embedding cache's settings.

    Attributes:
        bytes: bytes of rows (and their index) held at most; 0 turns the cache off.
        refresh_seconds: seconds from the start of one read of the shards' changes to the
            next; a cached row is never more than twice this behind its serving shard.
        prefill: "auto" copies the serving shards in whole when their rows fit in
            `bytes` (at start, and after a shard restarts); "off" never does.
    """

    bytes: Annotated[int, pydantic.Field(ge=0)] = 256 * 1024 * 1024
    refresh_seconds: Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)] = 0.1
    prefill: Literal["auto", "off"] = "auto"

    @property
    def enabled(self) -> bool:
        return self.bytes > 0

    @property
    def max_staleness(self) -> float:
        """Seconds a cached row may be behind its serving shard, at most."""
        return 2 * self.refresh_seconds


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """What a cache has done since it was made (its own counts; the metrics are per process)."""

    hits: int
    misses: int
    refused: int
    invalidations: int
    rows: int
    bytes: int
    evictions: int


@dataclasses.dataclass
class _Feed:
    """Where the cache stands in one serving shard's changes (the refresher's own state)."""

    incarnation: str = ""  # "" until the cache follows the shard
    position: int = 0  # the shard version every cached row of it is complete up to
    failure: str = ""  # the failure being reported, until a success


class _Restarted(Exception):
    """The shard answered an export with another incarnation than its Stats: it restarted meanwhile."""


class CachedEmbeddings:
    """A `SparseBackend` for serving: lookups answered from cached rows, misses from the shards.

    Read-only: training lookups and gradients go to the training shards, never through
    this. `start` runs the refresher; `refresh` is one round of it, callable directly.

    Args:
        shards: the serving shards' client: misses are looked up through it and each
            shard's changes read with its `shard(i)` clients. Not closed by `close`.
        table_dims: each table's embedding dimension.
        config: the budget, refresh interval and prefill (must be enabled).

    Raises:
        ValueError: the budget cannot hold a few rows of every table.
    """

    def __init__(self, shards: ShardedEmbeddingClient, table_dims: Mapping[str, int], config: CacheConfig) -> None:
        if not config.enabled:
            raise ValueError("the embedding cache is off (bytes=0): look up the shards directly")
        self.config = config
        self._shards = shards
        count = shards.num_shards
        self._dims = dict(table_dims)
        self._salts = {name: np.uint64(stable_hash64(name)) for name in table_dims}
        self._rows = RowCache(table_dims, config.bytes, count)
        self._lock = ReadWriteLock()  # lookups read; inserts, feed updates and drops write
        # Per shard, read by lookups and changed under the write lock (the time without it):
        self._refreshed_at = np.full(count, -math.inf)  # monotonic start of the last successful refresh
        self._epochs = np.zeros(count, dtype=np.int64)
        self._following = np.zeros(count, dtype=bool)  # whether misses of the shard may be inserted
        self._feeds = [_Feed() for _ in range(count)]
        self._refresh_lock = threading.Lock()  # one refresh at a time: the thread and callers
        self._refresher = PeriodicTask("embedding-cache-refresh", config.refresh_seconds, self.refresh)
        self._counts_lock = threading.Lock()
        self._hits = self._misses = self._refused = self._invalidations = 0
        self._export_metrics()

    def _export_metrics(self) -> None:
        # Computed at scrape time, through a weak reference: the registry is global and
        # must not keep a closed cache alive.
        this = weakref.ref(self)

        def read(what: str, shard: int = 0) -> float:
            cache = this()
            if cache is None:
                return math.nan
            if what == "staleness":  # NaN before the shard's first successful refresh
                refreshed = cache._refreshed_at[shard]
                return math.nan if math.isinf(refreshed) else float(time.monotonic() - refreshed)
            return float(getattr(cache._rows, what))

        CACHE_BYTES.set_function(lambda: read("bytes"))
        CACHE_ROWS.set_function(lambda: read("rows"))
        for shard in range(self._shards.num_shards):
            CACHE_STALENESS.labels(str(shard)).set_function(lambda shard=shard: read("staleness", shard))

    # ------------------------------------------------------------------ lookups

    def lookup(
        self,
        features: Mapping[str, np.ndarray],
        training: bool = False,
        update_time: float = 0.0,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Embeddings of ids per table, float32 [n, dim] each, in input order, as the shards would answer.

        Args:
            features: int64 ids per table (any 1-D shape; repeats allowed).
            training: must be False.
            update_time: unused (a serving lookup changes nothing).
            timeout: seconds the shards' lookup of the misses may take; None: the client's.

        Raises:
            ValueError: a training lookup, or an unknown table.
            MonolithError: the shards' lookup of the misses failed.
        """
        if training:
            raise ValueError("the embedding cache answers serving lookups only; training looks up the training shards")
        usable = (time.monotonic() - self._refreshed_at) <= self.config.max_staleness
        answers: dict[str, np.ndarray] = {}
        missing: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        total = 0
        with self._lock.read():
            epochs = self._epochs.copy()  # before the misses are looked up: see the module docstring
            for name, ids in features.items():
                if name not in self._dims:
                    raise ValueError(f"unknown table {name!r}; known: {', '.join(sorted(self._dims))}")
                flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
                rows = np.empty((flat.shape[0], self._dims[name]), dtype=np.float32)
                positions = self._rows.get(name, flat, usable, rows)
                answers[name] = rows
                total += flat.shape[0]
                if positions.shape[0]:
                    missing[name] = (flat[positions], positions)
        misses = sum(ids.shape[0] for ids, _ in missing.values())
        self._count(hits=total - misses, misses=misses)
        if missing:
            fetched = self._shards.lookup({name: ids for name, (ids, _) in missing.items()}, timeout=timeout)
            for name, (_, positions) in missing.items():
                answers[name][positions] = fetched[name]
            self._insert({name: (ids, fetched[name]) for name, (ids, _) in missing.items()}, epochs)
        return answers

    def apply_gradients(self, gradients: object, update_time: float = 0.0) -> tuple[int, int]:
        raise ValueError("the embedding cache is read-only: gradients go to the training shards")

    def apply_and_lookup(self, *args: object, **kwargs: object) -> tuple[int, int, dict[str, np.ndarray]]:
        raise ValueError("the embedding cache is read-only: gradients go to the training shards")

    def _insert(self, fetched: Mapping[str, tuple[np.ndarray, np.ndarray]], epochs: np.ndarray) -> None:
        """Caches rows looked up on a miss, for the shards whose changes were not applied meanwhile."""
        owners = {
            name: route_to_shards(ids, self._salts[name], self._shards.num_shards).astype(np.uint16)
            for name, (ids, _) in fetched.items()
        }
        refused = 0
        with self._lock.write():
            allowed = self._following & (self._epochs == epochs)
            if not allowed.all():
                refused = sum(int(np.count_nonzero(~allowed[owners[name]])) for name in fetched)
            if allowed.any():
                for name, (ids, rows) in fetched.items():
                    self._put(name, ids, rows, owners[name], allowed, evict=True)
        if refused:
            CACHE_REFUSED.inc(refused)
            self._count(refused=refused)

    def _put(self, name: str, ids: np.ndarray, rows: np.ndarray, owners: np.ndarray, allowed: np.ndarray,
             evict: bool) -> None:  # fmt: skip
        evicted = self._rows.put(name, ids, rows, owners, allowed, evict)[1]
        if evicted:
            CACHE_EVICTIONS.inc(evicted)

    # ------------------------------------------------------------------ refresher

    def start(self) -> None:
        """Starts the refresher: a round at once, then one every `refresh_seconds`."""
        self._refresher.start()

    def close(self) -> None:
        """Stops the refresher (the shards' client stays open: it is the caller's). Final."""
        self._refresher.stop()

    def refresh(self) -> None:
        """One round: each serving shard's changes since the cache's position, applied.

        Failures are per shard, logged once per outage and counted; they never raise.
        """
        with self._refresh_lock:
            answers: list[tuple[float, pb.StatsResponse | None]] = []
            for shard in range(self._shards.num_shards):
                started = time.monotonic()  # before Stats: everything read after is at least this fresh
                try:
                    answers.append((started, self._shards.shard(shard).stats()))
                except MonolithError as exc:
                    answers.append((started, None))
                    self._failed(shard, exc)
            whole = self.config.prefill == "auto" and self._fits([stats for _, stats in answers])
            for shard, (started, stats) in enumerate(answers):
                if stats is not None:
                    self._refresh_shard(shard, stats, started, whole)

    def _refresh_shard(self, shard: int, stats: pb.StatsResponse, started: float, whole: bool) -> None:
        feed = self._feeds[shard]
        try:
            if stats.incarnation != feed.incarnation:
                self._follow(shard, stats, whole, "restarted" if feed.incarnation else "")
            elif stats.version > feed.position:
                if feed.position == 0:  # an export since 0 lists no deletions: follow afresh instead
                    self._follow(shard, stats, whole, "")
                else:
                    try:
                        self._catch_up(shard, feed)
                    except FailedPrecondition:  # its deletion log no longer reaches back to the position
                        self._follow(shard, stats, whole, "forgotten")
        except (MonolithError, _Restarted) as exc:
            if isinstance(exc, _Restarted):
                self._invalidate(shard, "restarted")
            elif not feed.incarnation:  # failed while following afresh: what it copied is of no known state
                self._invalidate(shard, "failed")
            self._failed(shard, exc)
            return
        self._refreshed_at[shard] = started
        if feed.failure:
            _LOGGER.info("embedding cache: serving shard %d refreshed again", shard)
            feed.failure = ""

    def _follow(self, shard: int, stats: pb.StatsResponse, whole: bool, reason: str) -> None:
        """Drops a shard's rows and follows it afresh: from its Stats, or by copying it in whole."""
        self._invalidate(shard, reason)
        feed = self._feeds[shard]
        position = max(stats.version - 1, 0)  # single writer: every mutation up to it is applied
        if whole:
            rows = 0
            for unit in self._units(shard, 0, stats.incarnation):
                position = max(position, unit[-1].version)
                rows += self._apply(shard, unit)
            _LOGGER.info("embedding cache: copied serving shard %d in whole: %d rows", shard, rows)
        with self._lock.write():
            self._following[shard] = True
            self._epochs[shard] += 1
        feed.incarnation, feed.position = stats.incarnation, position

    def _catch_up(self, shard: int, feed: _Feed) -> None:
        """Applies a shard's changes since the position, an export unit at a time."""
        version = None
        for unit in self._units(shard, feed.position, feed.incarnation):
            self._apply(shard, unit)
            version = unit[-1].version  # every chunk of one export carries the version it is complete up to
        if version is not None:  # an export with no chunks carries none: nothing changed
            feed.position = version

    def _units(self, shard: int, since: int, incarnation: str):  # type: ignore[no-untyped-def]
        """A shard's export since a version, in lists of chunks of at most ATOMIC_EXPORT_ENTRIES entries."""
        unit: list[Chunk] = []
        entries = 0
        for chunk in self._shards.shard(shard).export(since, max_rows_per_chunk=EXPORT_CHUNK_ROWS):
            if chunk.incarnation != incarnation:
                raise _Restarted(f"serving shard {shard} restarted during the export (incarnation "
                                 f"{incarnation[:8]} -> {chunk.incarnation[:8]})")  # fmt: skip
            unit.append(chunk)
            entries += chunk.num_rows + chunk.num_deleted
            if entries > ATOMIC_EXPORT_ENTRIES:
                yield unit
                unit, entries = [], 0
        if unit:
            yield unit

    def _apply(self, shard: int, unit: list[Chunk]) -> int:
        """Applies chunks of a shard's export as one unit: deletions, then rows (inserted only into free room)."""
        own = np.zeros(self._shards.num_shards, dtype=bool)
        own[shard] = True
        rows = 0
        with self._lock.write():
            for chunk in unit:
                dim = self._dims.get(chunk.table)
                if dim is None:
                    continue  # a table this model does not look up
                width = chunk.rows.values.shape[1]
                if width != dim:
                    raise MonolithError(f"serving shard {shard} exported rows of width {width} for table "
                                        f"{chunk.table!r}, whose dim is {dim} in the model config")  # fmt: skip
                if chunk.num_deleted:
                    self._rows.delete(chunk.table, chunk.deleted_ids)
                if chunk.num_rows:
                    owners = np.full(chunk.num_rows, shard, dtype=np.uint16)
                    self._put(chunk.table, chunk.rows.ids, chunk.rows.values, owners, own, evict=False)
                    rows += chunk.num_rows
            self._epochs[shard] += 1
        return rows

    def _invalidate(self, shard: int, reason: str) -> None:
        """Drops every row cached from a shard and stops inserting its misses until it is followed again.

        `reason` (a label of CACHE_INVALIDATIONS) is reported; "" drops quietly (nothing
        was followed, or only what a shard at version 0 could hold).
        """
        self._feeds[shard].incarnation = ""
        with self._lock.write():
            self._following[shard] = False
            self._epochs[shard] += 1
            dropped = self._rows.drop_owner(shard)
        if reason:
            CACHE_INVALIDATIONS.labels(reason).inc()
            self._count(invalidations=1)
            _LOGGER.info("embedding cache: dropped the %d rows of serving shard %d (%s)", dropped, shard, reason)

    def _failed(self, shard: int, exc: BaseException) -> None:
        CACHE_REFRESH_FAILURES.labels(str(shard)).inc()
        feed = self._feeds[shard]
        error = describe(exc)
        kind = error.split(":", 1)[0]
        if kind != feed.failure:  # one warning per outage, or when its cause changes
            _LOGGER.warning(
                "embedding cache: refreshing serving shard %d failed: %s; its cached rows are not answered once "
                "%g s behind", shard, error, self.config.max_staleness,
            )  # fmt: skip
        feed.failure = kind

    def _fits(self, answers: list[pb.StatsResponse | None]) -> bool:
        """Whether every row the shards hold fits in the budget (all shards must have answered)."""
        if any(stats is None for stats in answers):
            return False
        rows = dict.fromkeys(self._dims, 0)
        for stats in answers:
            for table in stats.tables:
                if table.table in rows:
                    rows[table.table] += table.rows
        return sum(footprint(rows[name], dim) for name, dim in self._dims.items()) <= self.config.bytes

    # ------------------------------------------------------------------ counts

    def _count(self, hits: int = 0, misses: int = 0, refused: int = 0, invalidations: int = 0) -> None:
        if hits:
            CACHE_HITS.inc(hits)
        if misses:
            CACHE_MISSES.inc(misses)
        with self._counts_lock:
            self._hits += hits
            self._misses += misses
            self._refused += refused
            self._invalidations += invalidations

    def stats(self) -> CacheStats:
        """This cache's counts and sizes."""
        with self._counts_lock:
            hits, misses, refused, invalidations = self._hits, self._misses, self._refused, self._invalidations
        return CacheStats(hits, misses, refused, invalidations, self._rows.rows, self._rows.bytes,
                          self._rows.evictions)  # fmt: skip

    def cached_from(self, shard: int) -> int:
        """Rows held that came from one serving shard."""
        with self._lock.read():
            return self._rows.owned_rows(shard)


# ---------------------------------------------------------------------- flags


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The embedding cache's flags of `monolith serving`."""
    defaults = CacheConfig()
    parser.add_argument("--embedding-cache-bytes", type=int, default=defaults.bytes,
                        help="bytes of embedding rows kept in process in front of the serving shards; 0 turns the "
                        f"cache off (default {defaults.bytes}: 256 MiB)")  # fmt: skip
    parser.add_argument("--embedding-cache-refresh", type=positive_seconds, default=defaults.refresh_seconds,
                        help="seconds between reads of each serving shard's changes; a cached row is never more than "
                        f"twice this behind its serving shard (default {defaults.refresh_seconds:g})")  # fmt: skip
    parser.add_argument("--embedding-cache-prefill", choices=("auto", "off"), default=defaults.prefill,
                        help="auto: when the serving shards' rows all fit in --embedding-cache-bytes, copy them in "
                        "whole at start and after a shard restarts (default auto)")  # fmt: skip


def build_cache(
    args: argparse.Namespace, shards: ShardedEmbeddingClient, config: ModelConfig
) -> CachedEmbeddings | None:
    """The embedding cache the flags ask for (not started), or None when it is off.

    Raises:
        ConfigError: a flag's value is out of range, or the budget cannot hold a few rows of every table.
    """
    if args.embedding_cache_bytes < 0:
        raise ConfigError(
            f"--embedding-cache-bytes must be >= 0 (0 turns the cache off), got {args.embedding_cache_bytes}"
        )
    cache = parse_config(
        CacheConfig,
        {"bytes": args.embedding_cache_bytes, "refresh_seconds": args.embedding_cache_refresh,
         "prefill": args.embedding_cache_prefill},
    )  # fmt: skip
    if not cache.enabled:
        return None
    dims = config.table_dims()
    least = RowCache.least_budget(dims)
    if cache.bytes < least:
        raise ConfigError(
            f"--embedding-cache-bytes {cache.bytes} cannot hold a few rows of each of the model's {len(dims)} "
            f"tables; give at least {least}, or 0 to turn the cache off"
        )
    return CachedEmbeddings(shards, dims, cache)
