"""Train→serve parameter sync: a serving shard follows its training shard.

The paper's training PS pushes the rows touched since the last sync to the serving PS
every interval (§2.2.3; 10 s in its code). Here the serving side pulls instead, because
then both restarts resume with no extra state:

- The serving process remembers the training shard's (incarnation, version) it has
  applied up to and asks for `Export(since_version=version)`: rows changed and ids
  deleted (expired) since then. The training shard keeps no per-follower state; its
  change logs and bounded deletion logs are the "touched-key set".
- A serving process that starts empty remembers nothing, so its first sync is a full
  copy (`since_version=0`).
- A restarted training shard starts a new incarnation whose versions restart from 0, so
  the serving side sees a different incarnation and copies it in full. It never clears its
  tables first: lookups keep answering throughout. **A rollback never shrinks serving**:
  rows this shard holds that the new incarnation lacks (created after the cut the
  controller restored, or lost by a shard restarted without a restore) are kept and served
  as they were (`retained.RetainedRows`) until training re-creates them (the replay after
  the cut), deletes them, or they expire by the table's `expire_after` on the training
  table's data clock.
- While the training shard is unreachable, or restarted and waiting to be restored from a
  checkpoint (it reports `awaiting_restore` and refuses exports), the serving shard keeps
  answering with the rows it has (stale) and the sync retries every interval. Once the
  shard is restored (a new incarnation) it is copied in full.
- A full copy of a new incarnation that lacks more than `max_resync_delete_fraction` of
  this shard's rows is an alarm (a training shard restarted empty without a restore,
  say): logged as an error and counted (`monolith_sync_resync_deletions_refused_total`).
  A full copy of the same incarnation (its deletion log no longer reached back) deletes
  what it lacks, except retained rows: those ids expired on training while unfollowed.

The sync lag is measured in data (event) time, never against the wall clock: the training
shard's data clock (the newest update time its tables have seen, from Stats) now, minus
its data clock as of the state this serving shard is complete up to. A replay of 1997
data in sync shows a lag of 0, not 28 years.

Only embeddings travel (no optimizer state), as in the paper's code: serving never
applies gradients. Imports go through the serving shard's `apply_synced_chunk` (clients'
Imports into a serving shard are refused), so each chunk applies all or nothing,
deletions before upserts, and re-applying one after a failed attempt is harmless. The
chunks of one incremental export are applied together as one unit
(`apply_synced_chunks`), so serving lookups see a training step that touched several
tables entirely or not at all; a full copy is applied chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import weakref
from typing import Iterator

import numpy as np

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.common.channel import UNLIMITED, ChannelConfig
from monolith.common.errors import FailedPrecondition, MonolithError, describe
from monolith.embedding.table import RowBatch
from monolith.embedding_ps.chunks import Chunk
from monolith.embedding_ps.client import EmbeddingPSClient
from monolith.embedding_ps.metrics import (
    SYNC_DELETIONS,
    SYNC_DELETIONS_REFUSED,
    SYNC_DURATION,
    SYNC_FAILURES,
    SYNC_FULL_RESYNCS,
    SYNC_LAG,
    SYNC_RETAINED,
    SYNC_ROWS,
    SYNC_VERSION,
)
from monolith.embedding_ps.retained import RetainedRows
from monolith.embedding_ps.shard import ATOMIC_EXPORT_ENTRIES, EmbeddingShard

_LOGGER = logging.getLogger("monolith.embedding_ps.sync")

DEFAULT_MAX_RESYNC_DELETE_FRACTION = 0.1
STATS_TIMEOUT = 5.0  # seconds; Stats is tiny, a slow answer means the shard is in trouble

# Reconnect quickly after the training shard comes back (gRPC's default backoff grows to
# 120 s, during which every sync would fail fast although the shard is up again). Any
# chunk size is accepted: the export request bounds it.
_CHANNEL = ChannelConfig(max_receive_bytes=UNLIMITED, fast_reconnect=True)

class SyncError(Exception):
    """The training shard answered, but with something this serving shard cannot follow."""


@dataclasses.dataclass(frozen=True)
class SyncResult:
    """What one sync attempt did.

    Attributes:
        ok: the training shard answered and everything it sent was applied.
        full_resync: the attempt copied the training shard in full.
        rows: rows upserted (also those applied before a failure).
        deletions: rows deleted: ids expired on training, or absent from a full copy.
        acknowledged: (incarnation, version) of the training shard the serving shard is
            complete up to after the attempt; None before the first successful sync.
        error: why the attempt failed; "" when ok.
    """

    ok: bool
    full_resync: bool = False
    rows: int = 0
    deletions: int = 0
    acknowledged: tuple[str, int] | None = None
    error: str = ""


@dataclasses.dataclass
class _Progress:
    """Counts of one attempt, kept up to date chunk by chunk so a failure reports them."""

    full_resync: bool = False
    rows: int = 0
    deletions: int = 0
    source_clock: int = 0


class ServingSync:
    """Keeps a local serving shard in step with one training shard.

    `sync_once` is one attempt, callable directly (tests); `start` runs it every
    `interval` seconds on a daemon thread until `stop`.

    Args:
        shard: the local shard to update; must have role "serving".
        training_address: "host:port" of the training shard with the same index.
        interval: seconds from the start of one attempt to the start of the next.
        timeout: seconds one Export stream (a full copy included) may take.
        max_resync_delete_fraction: the most of this shard's rows (before the copy) one
            full copy may delete; a copy that would delete more deletes nothing (logged
            and counted).

    Attributes:
        training_address: where the training shard is.
        acknowledged: (incarnation, version) of the training shard this shard is complete
            up to; None until the first successful sync.
        newest_update_time: newest row update time (seconds since the epoch) applied
            from the current training incarnation; 0 before any row.
        source_clock: the training shard's data clock (newest update time over its
            tables) at its latest Stats answer; 0 before any.
        synced_clock: the training shard's data clock as of the state this shard is
            complete up to (taken from the Stats that began the last successful attempt);
            None before the first successful sync.
        last_result: what the latest finished attempt did; None before the first.

    Raises:
        ValueError: the shard is not a serving shard, or interval/timeout are not positive.
    """

    def __init__(self, shard: EmbeddingShard, training_address: str, interval: float = 1.0,
                 timeout: float = 300.0,
                 max_resync_delete_fraction: float = DEFAULT_MAX_RESYNC_DELETE_FRACTION) -> None:  # fmt: skip
        if shard.config.role != "serving":
            raise ValueError(f"sync needs a serving shard to update, got role {shard.config.role!r}")
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"sync interval must be a positive number of seconds, got {interval}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"sync timeout must be a positive number of seconds, got {timeout}")
        if not 0 <= max_resync_delete_fraction <= 1:
            raise ValueError(f"max_resync_delete_fraction must be in [0, 1], got {max_resync_delete_fraction}")
        self._max_delete_fraction = max_resync_delete_fraction
        self.training_address = training_address
        self.acknowledged: tuple[str, int] | None = None
        self.newest_update_time = 0.0
        self.source_clock = 0
        self.synced_clock: int | None = None
        self._shard = shard
        self._interval = interval
        self._timeout = timeout
        # Chunks must pass this shard's own per-request id limit when imported.
        self._chunk_rows = min(shard.config.export_chunk_rows, shard.config.max_ids_per_request)
        self._unit_rows = ATOMIC_EXPORT_ENTRIES
        self._source = EmbeddingPSClient(training_address, timeout=STATS_TIMEOUT, stream_timeout=timeout,
                                         channel=_CHANNEL, name=f"training shard at {training_address}")  # fmt: skip
        self._attempt_lock = threading.Lock()  # one attempt at a time: thread and callers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serving-sync", daemon=True)
        self._outage: str | None = None  # the failure being reported, until a success
        self._outage_failures = 0
        self._outage_started = 0.0
        self._copies = 0
        self._last_result: SyncResult | None = None
        self.retained = RetainedRows()

        label = str(shard.config.shard)
        self._rows_metric = SYNC_ROWS.labels(label)
        self._deletions_metric = SYNC_DELETIONS.labels(label)
        self._refused_metric = SYNC_DELETIONS_REFUSED.labels(label)
        self._full_metric = SYNC_FULL_RESYNCS.labels(label)
        self._failures_metric = SYNC_FAILURES.labels(label)
        self._duration_metric = SYNC_DURATION.labels(label)
        self._version_metric = SYNC_VERSION.labels(label)
        self._retained_metric = SYNC_RETAINED.labels(label)
        # Computed at scrape time, so the lag keeps growing while syncs fail or hang. A weak
        # reference: the registry is global and must not keep a stopped sync alive.
        this = weakref.ref(self)

        def lag() -> float:
            sync = this()
            return sync.lag_seconds() if sync is not None else math.nan

        SYNC_LAG.labels(label).set_function(lag)

    # ---------------------------------------------------------------- running

    def start(self) -> None:
        """Syncs now and then every interval on a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread, cancelling an attempt in flight (imports are idempotent). Final."""
        self._stop.set()
        self._source.close()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def last_result(self) -> SyncResult | None:
        """The latest finished attempt's result (read-only), so callers can wait on it."""
        return self._last_result

    def lag_seconds(self) -> float:
        """Event-time lag: `source_clock - synced_clock` (>= 0); NaN before the first successful sync.

        Data time, not the wall clock: it grows only as training advances through the data
        (as far as the latest Stats answer shows), whatever the data's dates.
        """
        if self.synced_clock is None:
            return math.nan
        return float(max(0, self.source_clock - self.synced_clock))

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sync_once()
            except Exception:  # noqa: BLE001 - the thread must outlive a bug in one attempt
                if not self._stop.is_set():
                    _LOGGER.exception("sync from %s: unexpected error; retrying", self.training_address)
            self._stop.wait(max(0.0, self._interval - (time.monotonic() - started)))

    # ---------------------------------------------------------------- one sync

    def sync_once(self) -> SyncResult:
        """One attempt: applies what the training shard has that this shard lacks.

        Returns:
            What was applied; on failure `ok` is False and `error` says why. Failures
            leave the shard serving what it had plus any chunks applied before them.

        Raises:
            RuntimeError: called after `stop`.
        """
        if self._stop.is_set():
            raise RuntimeError("this ServingSync was stopped")
        with self._attempt_lock:
            started = time.monotonic()
            progress = _Progress()
            try:
                progress.source_clock = self._sync(progress)
            except (MonolithError, SyncError) as exc:
                result = self._failed(exc, progress)
            else:
                result = self._succeeded(progress)
            self._duration_metric.observe(time.monotonic() - started)
            self._last_result = result
            return result

    def _sync(self, progress: _Progress) -> int:
        """One attempt's work; returns the training shard's data clock when it began.

        The export that follows Stats is complete up to a version at least Stats', so
        when it is applied this shard holds every change up to that clock.
        """
        stats = self._source.stats()
        self._check_source(stats)
        clock = max((t.newest_update_time for t in stats.tables), default=0)
        self.source_clock = clock
        if self.acknowledged is None or self.acknowledged[0] != stats.incarnation:
            self._full_copy(stats.incarnation, progress)
            self._expire_retained(stats, progress)
            return clock
        incarnation, since = self.acknowledged
        if stats.version <= since:
            return clock  # nothing happened on the training shard since
        # The chunks of one incremental export are applied as one unit, so serving lookups
        # never see part of a training step; the training shard copied them at one instant
        # when they were at most ATOMIC_EXPORT_ENTRIES. A larger export (not atomic on the
        # training side either) is applied a unit of that size at a time, bounding memory
        # and how long serving lookups wait for a unit.
        try:
            version = since
            unit: list[tuple[str, RowBatch, np.ndarray, str]] = []
            unit_rows = 0
            newest = self.newest_update_time
            for chunk in self._export(since, incarnation):
                unit.append(self._entry(chunk))
                unit_rows += chunk.num_rows + chunk.num_deleted
                version = chunk.version
                newest = max(newest, chunk.newest_update_time)
                if unit_rows > self._unit_rows:
                    self._apply_unit(unit, progress)
                    unit, unit_rows = [], 0
            self._apply_unit(unit, progress)
            self.newest_update_time = newest
        except FailedPrecondition as exc:
            # The training shard's bounded deletion log no longer reaches back to `since`.
            _LOGGER.info("sync from %s: %s; copying in full", self.training_address, exc)
            self._full_copy(incarnation, progress)
            self._expire_retained(stats, progress)
            return clock
        # An export with no chunks carries no completeness version, so keep the old one:
        # asking again since it is correct, and costs only the (absent) changes.
        self._acknowledge(incarnation, version)
        self._expire_retained(stats, progress)
        return clock

    def _full_copy(self, incarnation: str, progress: _Progress) -> None:
        """Imports every row of the training shard; what it lacks is retained (a new incarnation) or deleted."""
        started = time.monotonic()
        progress.full_resync = True
        rows_before = sum(len(table) for table in self._shard.tables.values())
        previous = self.acknowledged
        received: dict[str, list[np.ndarray]] = {name: [] for name in self._shard.tables}
        version = 0  # no chunks: the training shard is empty; "since 0" is always safe
        newest = 0.0
        for chunk in self._export(0, incarnation):
            received[chunk.table].append(self._apply(chunk, progress))
            version = chunk.version
            newest = max(newest, chunk.newest_update_time)
        # Rows deleted on the training side while this shard was not following (or rows
        # of a previous training incarnation) were never sent as deletions: only the
        # complete copy tells which local rows it lacks.
        missing = {name: self._local_rows_missing_from(name, parts) for name, parts in received.items()}
        total_missing = sum(ids.shape[0] for ids, _ in missing.values())
        retained = 0
        if previous is None or previous[0] != incarnation:
            # A new incarnation: a restore to the last cut (or a restart that lost rows).
            # Serving keeps what it has; training's own changes decide each id from now on.
            cap = int(self._max_delete_fraction * rows_before)
            if total_missing > cap:
                self._refused_metric.inc(total_missing)
                _LOGGER.error(
                    "sync from %s: the full copy of incarnation %s lacks %d of this shard's %d rows, more than "
                    "--max-resync-delete-fraction=%g (%d). Was the training shard restarted without being restored "
                    "from a checkpoint? Keeping them all",
                    self.training_address, incarnation[:8], total_missing, rows_before, self._max_delete_fraction,
                    cap,
                )  # fmt: skip
            for name, parts in received.items():
                if parts:
                    self.retained.forget(name, np.concatenate(parts))  # re-created by the new incarnation
                self.retained.retain(name, *missing[name])
                retained += missing[name][0].shape[0]
        else:
            # The same incarnation copied again (its deletion log no longer reached back) lost
            # nothing: what it lacks expired while unfollowed, except what this shard retains.
            for name, (ids, _) in missing.items():
                self._delete(name, ids[~np.isin(ids, self.retained.ids(name))], progress)
        self._retained_metric.set(len(self.retained))
        # What this shard holds is now this incarnation's copy, plus the rows it retains.
        self.newest_update_time = newest
        self._acknowledge(incarnation, version)
        self._full_metric.inc()
        self._copies += 1
        _LOGGER.info(
            "sync from %s: %s full copy of incarnation %s complete up to version %d: %d rows upserted, "
            "%d deleted, %d kept that it lacks (%d retained in all) in %.2f s",
            self.training_address, "first" if self._copies == 1 else "new", incarnation[:8], version,
            progress.rows, progress.deletions, retained, len(self.retained), time.monotonic() - started,
        )  # fmt: skip

    def _expire_retained(self, stats: pb.StatsResponse, progress: _Progress) -> None:
        """Deletes the retained rows training would have expired by its tables' data clocks now."""
        if not len(self.retained):
            return
        clocks = {t.table: t.newest_update_time for t in stats.tables}
        for name, table in self._shard.tables.items():
            expire_after = table.config.expire_after
            if expire_after is None:
                continue
            due = self.retained.expired(name, clocks.get(name, 0), expire_after)
            if due.shape[0]:
                self._delete(name, due, progress)
                self.retained.forget(name, due)
        self._retained_metric.set(len(self.retained))

    def _delete(self, name: str, ids: np.ndarray, progress: _Progress) -> None:
        """Deletes local rows, a chunk at a time."""
        for start in range(0, ids.shape[0], self._chunk_rows):
            _, deleted = self._shard.apply_synced_chunk(name, _no_rows(self._shard, name),
                                                        ids[start : start + self._chunk_rows])  # fmt: skip
            progress.deletions += deleted
            self._deletions_metric.inc(deleted)

    def _export(self, since: int, incarnation: str) -> Iterator[Chunk]:
        """The training shard's export since a version, checked to come from `incarnation`."""
        for chunk in self._source.export(since, max_rows_per_chunk=self._chunk_rows):
            if chunk.incarnation != incarnation:
                # Versions of another incarnation mean nothing against `since`.
                raise SyncError(
                    f"training shard at {self.training_address} restarted during the sync "
                    f"(incarnation {incarnation[:8]} -> {chunk.incarnation[:8]}); copying it next time"
                )
            yield chunk

    def _entry(self, chunk: Chunk) -> tuple[str, RowBatch, np.ndarray, str]:
        """(table, rows, deleted ids, description) of one chunk, as the local shard applies it."""
        what = f"chunk of table {chunk.table!r} from {self.training_address}"
        return chunk.table, chunk.rows, chunk.deleted_ids, what

    def _apply(self, chunk: Chunk, progress: _Progress) -> np.ndarray:
        """Imports one chunk into the local shard; returns the ids of its rows."""
        upserted, deleted = self._shard.apply_synced_chunk(*self._entry(chunk))
        self._count(progress, upserted, deleted)
        return chunk.rows.ids

    def _apply_unit(self, chunks: list[tuple[str, RowBatch, np.ndarray, str]], progress: _Progress) -> None:
        """Imports chunks into the local shard as one unit (see `apply_synced_chunks`)."""
        if chunks:
            self._count(progress, *self._shard.apply_synced_chunks(chunks))
        if len(self.retained):
            for name, rows, deleted_ids, _ in chunks:  # training re-created or deleted these ids
                self.retained.forget(name, rows.ids)
                self.retained.forget(name, deleted_ids)
            self._retained_metric.set(len(self.retained))

    def _count(self, progress: _Progress, upserted: int, deleted: int) -> None:
        progress.rows += upserted
        progress.deletions += deleted
        self._rows_metric.inc(upserted)
        self._deletions_metric.inc(deleted)

    def _local_rows_missing_from(self, name: str, received: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, update times) of this shard's rows of `name` that are not among `received`."""
        local = [chunk.rows for chunk in self._shard.export(0, False, self._chunk_rows, [name])]
        if not local:
            return np.zeros(0, np.int64), np.zeros(0, np.uint32)
        ids = np.concatenate([rows.ids for rows in local])
        times = np.concatenate([rows.update_times for rows in local])
        if not received:
            return ids, times
        missing = ~np.isin(ids, np.concatenate(received))
        return ids[missing], times[missing]

    def _check_source(self, stats: pb.StatsResponse) -> None:
        """Refuses to follow a shard whose rows this shard could not hold."""
        mine = self._shard.config
        if (stats.shard, stats.num_shards) != (mine.shard, mine.num_shards):
            raise SyncError(
                f"{self.training_address} is shard {stats.shard} of {stats.num_shards}; this serving shard is "
                f"{mine.shard} of {mine.num_shards}"
            )
        unknown = sorted({s.table for s in stats.tables} - set(self._shard.tables))
        if unknown:
            raise SyncError(
                f"{self.training_address} has table(s) {', '.join(unknown)} this serving shard does not; "
                "start both from the same model config"
            )
        if not stats.incarnation:
            raise SyncError(f"{self.training_address} reports no incarnation; it predates sync")
        if stats.awaiting_restore:
            raise SyncError(
                f"{self.training_address} restarted and is waiting to be restored from a checkpoint; keeping this "
                "shard's rows until it is"
            )

    def _acknowledge(self, incarnation: str, version: int) -> None:
        self.acknowledged = (incarnation, version)
        self._version_metric.set(version)

    # --------------------------------------------------------------- outcomes

    def _succeeded(self, progress: _Progress) -> SyncResult:
        self.synced_clock = progress.source_clock
        if self._outage is not None:
            _LOGGER.info(
                "sync from %s recovered after %d failed attempt(s) over %.1f s",
                self.training_address, self._outage_failures, time.monotonic() - self._outage_started,
            )  # fmt: skip
            self._outage = None
        return SyncResult(True, progress.full_resync, progress.rows, progress.deletions, self.acknowledged)

    def _failed(self, exc: Exception, progress: _Progress) -> SyncResult:
        error = describe(exc)
        self._failures_metric.inc()
        # One WARNING per outage (or when its cause changes), not one per interval.
        kind = error.split(":", 1)[0]
        if self._outage is None:
            self._outage_failures = 0
            self._outage_started = time.monotonic()
        self._outage_failures += 1
        if kind != self._outage and not self._stop.is_set():
            _LOGGER.warning(
                "sync from %s failing: %s; serving keeps answering with the rows it has, retrying every %g s",
                self.training_address, error, self._interval,
            )  # fmt: skip
        self._outage = kind
        return SyncResult(False, progress.full_resync, progress.rows, progress.deletions, self.acknowledged, error)


def _no_rows(shard: EmbeddingShard, name: str) -> RowBatch:
    dim = shard.tables[name].dim
    return RowBatch(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.uint32))
