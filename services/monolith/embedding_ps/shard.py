"""One embedding-PS shard: every table's rows for the ids routed here. No gRPC in here.

The shard validates whole requests before touching any table, so a bad request changes
nothing; it owns the shard's version clock, checks that ids belong to this shard, and
enforces the role (a serving shard is read-only to clients and changes only by its own
sync from the training shard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
import threading
from typing import Annotated, Callable, Iterable, Iterator, Literal, NamedTuple, Sequence

import numpy as np
from pydantic import Field, model_validator

from monolith.common.config import LIST_AS_TUPLE, ConfigModel
from monolith.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable, shorten
from monolith.common.wire import require_finite
from monolith.embedding.concurrency import ReadWriteLock, VersionClock
from monolith.embedding.config import TableConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps.routing import route_to_shards
from monolith.embedding.table import EmbeddingTable, RowBatch, TableStats

Role = Literal["training", "serving"]
ROLES: tuple[str, ...] = Role.__args__  # type: ignore[attr-defined]
# An incremental export whose change-log and deletion-log entries (summed over tables; an
# upper bound on its rows and deletions) are at most this many is copied at one instant, so
# it holds each mutation whole. The bound also caps how long the copy holds the gate, and
# how long a serving shard holds its own gate applying one such export as a unit.
ATOMIC_EXPORT_ENTRIES = 262_144


class Gradients(NamedTuple):
    """One table's gradients in an ApplyGradients call.

    Attributes:
        table: the table's name.
        ids: int64 [n] ids.
        gradients: float32 [n, dim], each id's (summed) gradient.
        squares: float32 [n, dim], each id's sum of squared per-occurrence gradients (what
            Adagrad and FTRL accumulate, see `EmbeddingTable.apply_gradients`); None: the
            square of its gradient.
    """

    table: str
    ids: np.ndarray
    gradients: np.ndarray
    squares: np.ndarray | None = None


class ShardConfig(ConfigModel):
    """What one embedding-PS process holds and how it behaves.

    Attributes:
        shard: this shard's index, in 0..num_shards-1.
        num_shards: number of shards every table is split over.
        role: "training" (trainers look up, create and update rows) or "serving"
            (read-only to clients; changes arrive by its own sync from the training shard).
        tables: the tables (each feature's, and its bias table).
        max_ids_per_request: ids (summed over tables) one request may carry.
        max_message_bytes: the largest message the server may send; lookups whose answer
            would be larger are refused before they change anything, and export chunks
            are cut to fit.
        export_chunk_rows: default rows per exported chunk (also capped by the two limits
            above, so an export always imports into a shard configured alike).
        initial_capacity: rows each table starts with.
        max_time_ahead: seconds an update time (a mutation's data time, an imported row's
            update time) may be ahead of this server's clock; later ones are refused, since
            one far-future time would move the tables' data clock and expire every row.
        restore_required: (training role) start awaiting a restore: refuse lookups,
            writes and exports (Unavailable) until `restore` has run, so that neither
            trainers nor serving shards take a restarted, empty shard for the real one.
    """

    shard: Annotated[int, Field(ge=0)]
    num_shards: Annotated[int, Field(ge=1)]
    role: Role
    tables: Annotated[tuple[TableConfig, ...], LIST_AS_TUPLE, Field(min_length=1)]
    max_ids_per_request: Annotated[int, Field(ge=1)] = 1_000_000
    max_message_bytes: Annotated[int, Field(ge=1, le=2**31 - 1)] = 64 * 1024 * 1024
    export_chunk_rows: Annotated[int, Field(ge=1)] = 65_536
    initial_capacity: Annotated[int, Field(ge=1)] = 1024
    max_time_ahead: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 86_400.0
    restore_required: bool = False

    @model_validator(mode="after")
    def _shard_in_range(self) -> ShardConfig:
        if self.shard >= self.num_shards:
            raise ValueError(f"shard: must be in 0..{self.num_shards - 1}, got {self.shard}")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"tables: names must be distinct, got {sorted(names)}")
        if self.restore_required and self.role != "training":
            raise ValueError("restore_required: only a training shard is restored; serving shards follow by sync")
        return self


@dataclasses.dataclass(frozen=True)
class ExportChunk:
    """A piece of one table's export: changed rows and/or deleted ids."""

    table: str
    rows: RowBatch
    includes_optimizer_state: bool
    deleted_ids: np.ndarray
    version: int

    @property
    def newest_update_time(self) -> float:
        """Newest last-update time among the chunk's rows (whole seconds); 0 if it has none."""
        return float(self.rows.update_times.max()) if self.rows.update_times.shape[0] else 0.0


class EmbeddingShard:
    """The tables of one shard, with request validation and the version clock.

    Attributes:
        incarnation: a random id drawn when the shard is created and again at every
            restore. Versions restart from 0 with a new process, so a follower that
            remembers (incarnation, version) can tell "nothing new" from "a different shard
            that happens to be at that version".
        on_restored: called after a restore (the process reports SERVING from then on).
    """

    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        self.incarnation = uuid.uuid4().hex
        self.clock = VersionClock()
        # Every mutation holds the gate shared from taking its version until it is applied
        # to every table; an export holds it exclusively for an instant, so it sees each
        # mutation entirely or not at all. On a serving shard lookups hold it shared and
        # sync applies each incremental export under it exclusively, so readers never see
        # half a training step.
        self._gate = ReadWriteLock()
        self.tables = {s.name: EmbeddingTable(s, config.initial_capacity) for s in config.tables}
        self._salts = {s.name: stable_hash64(s.name) for s in config.tables}
        self._awaiting_restore = config.restore_required
        self._restore_lock = threading.Lock()  # one restore at a time
        self.on_restored: Callable[[], None] | None = None

    @property
    def version(self) -> int:
        """The newest version handed out."""
        return self.clock.current

    @property
    def awaiting_restore(self) -> bool:
        """Started with `restore_required` and not restored yet."""
        return self._awaiting_restore

    def _check_restored(self, what: str) -> None:
        if self._awaiting_restore:
            raise Unavailable(
                f"{what}: training shard {self.config.shard} restarted and is waiting to be restored from a "
                "checkpoint"
            )

    # --------------------------------------------------------------- requests

    def lookup(
        self,
        requests: Sequence[tuple[str, np.ndarray, np.ndarray | None]],
        training: bool,
        update_time: float = 0.0,
    ) -> list[np.ndarray]:
        """Embeddings for (name, ids, counts) requests, in order.

        Args:
            requests: per name, int64 ids and optional int32 occurrence counts.
            training: count occurrences and create admitted rows (training role only).
            update_time: data (event) time stamped on created rows; 0 means none given:
                rows get their table's newest update time, and no table's clock moves.

        Returns:
            float32 [n, dim] per request.
        """
        self._check_lookup(requests, training)
        return self._checked_lookup(requests, training, update_time)

    def apply_then_lookup(
        self,
        gradients: Sequence[Gradients | tuple],
        update_time: float,
        requests: Sequence[tuple[str, np.ndarray, np.ndarray | None]],
        training: bool,
        lookup_update_time: float = 0.0,
    ) -> tuple[int, int, list[np.ndarray]]:
        """`apply_gradients`, then `lookup`; the lookup is checked before anything is applied.

        Returns:
            (rows updated, gradients dropped, float32 [n, dim] per lookup request).
        """
        self._check_lookup(requests, training)
        applied, filtered = self.apply_gradients(gradients, update_time)
        return applied, filtered, self._checked_lookup(requests, training, lookup_update_time)

    def _checked_lookup(
        self, requests: Sequence[tuple[str, np.ndarray, np.ndarray | None]], training: bool, update_time: float
    ) -> list[np.ndarray]:
        if not training:
            with self._gate.read() if self.config.role == "serving" else contextlib.nullcontext():
                return [self.tables[name].lookup(ids) for name, ids, _ in requests]
        now = self._resolve_time(update_time)
        with self._mutation() as version:
            return [self.tables[name].lookup_train(ids, counts, now, version) for name, ids, counts in requests]

    def _check_lookup(self, requests: Sequence[tuple[str, np.ndarray, np.ndarray | None]], training: bool) -> None:
        """Raises what `lookup` would raise for these requests before doing anything."""
        if training and self.config.role != "training":
            raise FailedPrecondition(
                f"shard {self.config.shard} has role {self.config.role!r}: training lookups need a training shard"
            )
        self._check_restored("lookup")
        self._check_ids(requests)
        answer_bytes = sum(ids.shape[0] * (4 * self.tables[name].dim + 16) for name, ids, _ in requests)
        if answer_bytes > self.config.max_message_bytes:
            raise ResourceExhausted(
                f"the answer would be about {answer_bytes} bytes, over the max message size "
                f"{self.config.max_message_bytes}; split the request"
            )
        for name, ids, counts in requests:
            if counts is not None:
                if counts.shape != ids.shape:
                    raise InvalidArgument(f"table {name!r}: {counts.shape[0]} counts for {ids.shape[0]} ids")
                if counts.size and counts.min() < 1:
                    raise InvalidArgument(f"table {name!r}: occurrence counts must be >= 1, got {counts.min()}")

    def apply_gradients(self, requests: Sequence[Gradients | tuple], update_time: float = 0.0) -> tuple[int, int]:
        """Applies gradients per table; returns (rows updated, gradients dropped).

        Args:
            requests: `Gradients` (or tuples of its fields: (table, ids, gradients[,
                squares])), a table at most once.
            update_time: stamped on updated rows, as in `lookup` (0: none given).
        """
        requests = [Gradients(*r) for r in requests]
        if self.config.role != "training":
            raise FailedPrecondition(
                f"shard {self.config.shard} has role {self.config.role!r}: it is read-only, gradients go to "
                "the training shard"
            )
        self._check_restored("apply gradients")
        self._check_ids([(name, ids, None) for name, ids, _, _ in requests])
        for name, ids, grads, squares in requests:
            dim = self.tables[name].dim
            for what, values in (("gradients", grads), ("squared_gradients", squares)):
                if values is None:
                    continue
                if values.ndim != 2 or values.shape != (ids.shape[0], dim):
                    raise InvalidArgument(
                        f"table {name!r}: {what} of shape {tuple(values.shape)} do not match "
                        f"{ids.shape[0]} ids x dim {dim}"
                    )
                require_finite(values, f"table {name!r} {what}")
            if squares is not None and (squares < 0).any():
                raise InvalidArgument(f"table {name!r}: squared_gradients must be >= 0")
        now = self._resolve_time(update_time)
        applied = filtered = 0
        with self._mutation() as version:
            for name, ids, grads, squares in requests:
                a, f = self.tables[name].apply_gradients(ids, grads, now, version, squares)
                applied += a
                filtered += f
        return applied, filtered

    def expire(self, now: float | None = None) -> dict[str, int]:
        """Runs every table's expiry sweep; returns rows evicted per table.

        Each table is swept in bounded windows, each a mutation of its own (a version, the
        gate held shared, the table's write lock held briefly), so lookups and exports go
        on during a sweep of a large table.
        """
        return {name: table.expire_in_windows(now, self._mutation) for name, table in self.tables.items()}

    def export(
        self, since: int, include_state: bool, max_rows: int = 0, tables: Sequence[str] = ()
    ) -> Iterator[ExportChunk]:
        """Rows changed and ids deleted after version `since`, table by table.

        The export starts at an instant when no mutation is in flight; every chunk
        carries that instant's version, which the export is complete up to, and a consumer
        passes it as its next `since`. Per table, deletion chunks come before row
        chunks, so applying the chunks in order (deletions first) gives the right rows.

        Cost and atomicity: an incremental export (since > 0) reads only the changes
        after `since` (see EmbeddingTable's change log). When they are at most
        ATOMIC_EXPORT_ENTRIES they are all copied at that instant, so a mutation that
        touched several tables is in the export entirely or not at all. A full export
        (since 0), or a larger incremental one, reads each chunk when it is sent: it may
        also hold changes made after that instant (never fewer than those before it),
        and may hold part of such a change; the next export completes it.

        Raises:
            FailedPrecondition: deletions after `since` were forgotten; export since 0.
        """
        self._check_restored("export")
        if since < 0:
            raise InvalidArgument(f"since_version must be >= 0, got {since}")
        if max_rows < 0:
            raise InvalidArgument(f"max_rows_per_chunk must be >= 0, got {max_rows}")
        for name in tables:
            self._table(name)
        if len(set(tables)) != len(tables):
            raise InvalidArgument(f"tables to export must be distinct, got {shorten(repr(list(tables)))}")
        names = list(tables) or list(self.tables)
        chunk_rows = {name: self._chunk_rows(self.tables[name], include_state, max_rows) for name in names}
        copied: dict[str, tuple[RowBatch, np.ndarray]] = {}
        with self._gate.write():
            # No mutation is in flight: every one numbered up to `version` is applied, no later one.
            version = self.clock.current
            changes = sum(self.tables[name].change_count(since) for name in names) if since > 0 else -1
            atomic = 0 <= changes <= ATOMIC_EXPORT_ENTRIES
            if atomic:
                copied = {name: _changes(self.tables[name], since, include_state) for name in names}
        if not atomic:
            # Every table's deletions before any chunk, so a too-old `since` fails first.
            no_rows = {name: _empty_rows(self.tables[name], include_state) for name in names}
            copied = {name: (no_rows[name], _deleted(self.tables[name], since)) for name in names}
        for name in names:
            table, step = self.tables[name], chunk_rows[name]
            rows, deleted = copied[name]
            for start in range(0, deleted.shape[0], step):
                yield ExportChunk(name, _empty_rows(table, include_state), include_state,
                                  deleted[start : start + step], version)  # fmt: skip
            batches = _slices(rows, step) if atomic else table.export(since, include_state, step)
            for batch in batches:
                yield ExportChunk(name, batch, include_state, np.zeros(0, np.int64), version)

    def import_chunk(self, name: str, rows: RowBatch, deleted_ids: np.ndarray, what: str = "") -> tuple[int, int]:
        """Applies one exported chunk a client sent (Import), all or nothing: deletions first, then upserts.

        A stream of chunks is applied chunk by chunk; applying a chunk again is harmless
        (upserts and deletions are idempotent), so a failed import can simply be retried.

        Returns:
            (rows upserted, rows deleted).

        Raises:
            FailedPrecondition: this is a serving shard. It mirrors its training shard, so a
                row written by anyone else would be served until training changed it.
        """
        if self.config.role != "training":
            raise FailedPrecondition(
                f"shard {self.config.shard} has role {self.config.role!r}: it changes only by sync from its training "
                "shard; import into the training shard"
            )
        self._check_restored("import")
        return self._apply_one_chunk(name, rows, deleted_ids, what)

    def restore(self, chunks: Iterable[tuple[str, RowBatch, np.ndarray, str]]) -> int:
        """Replaces every table with the rows of (name, rows, deleted ids, what) chunks: a checkpoint.

        The chunks are loaded into new tables beside the live ones (deletions, then
        upserts, chunk by chunk, as an export is applied), which are swapped in at one
        instant once all are in; the shard then takes a new incarnation (its followers
        copy it in full) and stops awaiting a restore. A bad chunk fails the restore and
        changes nothing. No chunks restores an empty shard.

        Returns:
            Rows held after the restore.

        Raises:
            FailedPrecondition: this is a serving shard.
            InvalidArgument: a chunk that does not fit (unknown table, wrong width, ids of
                other shards, non-finite values).
        """
        if self.config.role != "training":
            raise FailedPrecondition(
                f"shard {self.config.shard} has role {self.config.role!r}: it changes only by sync from its training "
                "shard; restore the training shard"
            )
        with self._restore_lock:
            fresh = {s.name: EmbeddingTable(s, self.config.initial_capacity) for s in self.config.tables}
            with self.clock.mutation() as version:
                for name, rows, deleted_ids, what in chunks:
                    self._checked_chunk(name, rows, deleted_ids, what)
                    _apply_chunk(fresh[name], rows, deleted_ids, version)
            with self._gate.write(), self.clock.mutation():
                self.tables = fresh
                self.incarnation = uuid.uuid4().hex
                self._awaiting_restore = False
            rows_held = sum(len(t) for t in fresh.values())
        if self.on_restored is not None:
            self.on_restored()
        return rows_held

    def apply_synced_chunk(
        self, name: str, rows: RowBatch, deleted_ids: np.ndarray, what: str = ""
    ) -> tuple[int, int]:
        """Applies one chunk of the training shard's export, in any role, like `import_chunk`.

        Only this process's own sync calls it; no RPC reaches it.

        Returns:
            (rows upserted, rows deleted).
        """
        return self._apply_one_chunk(name, rows, deleted_ids, what)

    def _apply_one_chunk(self, name: str, rows: RowBatch, deleted_ids: np.ndarray, what: str) -> tuple[int, int]:
        table = self._checked_chunk(name, rows, deleted_ids, what)
        with self._mutation() as version:
            return _apply_chunk(table, rows, deleted_ids, version)

    def apply_synced_chunks(self, chunks: Sequence[tuple[str, RowBatch, np.ndarray, str]]) -> tuple[int, int]:
        """Applies (name, rows, deleted ids, what) chunks of one export as one unit.

        All are checked first, then applied in order with one version while the gate is
        held exclusively: lookups (which hold it shared on a serving shard) see all of
        them or none, so a training step that touched several tables is never half
        visible. Only this process's own sync calls it.

        Returns:
            (rows upserted, rows deleted), summed.
        """
        tables = [self._checked_chunk(name, rows, deleted, what) for name, rows, deleted, what in chunks]
        upserted = deleted_count = 0
        with self._gate.write(), self.clock.mutation() as version:
            for table, (_, rows, deleted, _) in zip(tables, chunks):
                u, d = _apply_chunk(table, rows, deleted, version)
                upserted += u
                deleted_count += d
        return upserted, deleted_count

    def _checked_chunk(self, name: str, rows: RowBatch, deleted_ids: np.ndarray, what: str) -> EmbeddingTable:
        """The table a chunk goes to, once the whole chunk is known to fit it."""
        table = self._table(name)
        what = what or f"table {name!r}"
        n = rows.ids.shape[0]
        if rows.values.shape[:1] != (n,) or rows.update_times.shape != (n,):
            raise InvalidArgument(
                f"{what}: {n} ids, {rows.values.shape[0]} value rows and {rows.update_times.shape[0]} update_times; "
                "they must match"
            )
        if rows.values.ndim != 2 or rows.values.shape[1] not in (table.dim, table.width):
            raise InvalidArgument(
                f"{what}: rows of width {rows.values.shape[-1]} fit neither the embedding dim {table.dim} "
                f"nor the full row width {table.width} (embedding + {table.config.optimizer.kind} state)"
            )
        self._check_ids([(name, np.concatenate([rows.ids, deleted_ids]), None)])
        require_finite(rows.values, f"{what} values")
        if n:
            self._resolve_time(float(rows.update_times.max()))
        return table

    def stats(self) -> dict[str, TableStats]:
        """Per-table sizes and counters."""
        return {name: table.stats() for name, table in self.tables.items()}

    @contextlib.contextmanager
    def _mutation(self) -> Iterator[int]:
        """One mutation: the gate held shared while it takes its version and is applied."""
        with self._gate.read(), self.clock.mutation() as version:
            yield version

    # ------------------------------------------------------------- validation

    def _table(self, name: str) -> EmbeddingTable:
        table = self.tables.get(name)
        if table is None:
            raise InvalidArgument(f"unknown table {shorten(repr(name))}; this shard has: {', '.join(sorted(self.tables))}")
        return table

    def _resolve_time(self, update_time: float) -> float:
        """The data time a mutation stamps, checked; 0 (none given) stays 0.

        Tables keep their own data clocks (see EmbeddingTable): 0 stamps a table's clock
        and never moves it. The wall clock is only a sanity bound here, never a stamp: a
        time far ahead of it is refused, since it would move every table's data clock
        forward and the next expiry sweep would evict every row.
        """
        if not np.isfinite(update_time) or update_time < 0:
            raise InvalidArgument(f"update_time must be a finite number of seconds >= 0, got {update_time}")
        now = time.time()
        if update_time > now + self.config.max_time_ahead:
            raise InvalidArgument(
                f"update_time {update_time:.0f} is more than max_time_ahead={self.config.max_time_ahead:g} s "
                f"ahead of this server's clock ({now:.0f})"
            )
        return update_time

    def _check_ids(self, requests: Sequence[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
        """Rejects unknown or repeated tables, oversized requests and ids of other shards."""
        total = sum(ids.shape[0] for _, ids, _ in requests)
        if total > self.config.max_ids_per_request:
            raise ResourceExhausted(
                f"request carries {total} ids; the limit is max_ids_per_request={self.config.max_ids_per_request}"
            )
        seen: set[str] = set()
        for name, ids, _ in requests:
            self._table(name)
            if name in seen:
                raise InvalidArgument(f"table {name!r} appears more than once in the request")
            seen.add(name)
            if self.config.num_shards > 1 and ids.shape[0]:
                owners = route_to_shards(ids, self._salts[name], self.config.num_shards)
                wrong = np.flatnonzero(owners != self.config.shard)
                if wrong.size:
                    i = int(wrong[0])
                    raise InvalidArgument(
                        f"table {name!r}: {wrong.size} id(s) belong to other shards, e.g. id {int(ids[i])} belongs "
                        f"to shard {int(owners[i])}, not {self.config.shard} (of {self.config.num_shards})"
                    )


    def _chunk_rows(self, table: EmbeddingTable, include_state: bool, requested: int) -> int:
        """Rows per export chunk: as asked (or the default), within both request limits."""
        row_bytes = 8 + 4 + 4 * (table.width if include_state else table.dim)
        fitting = max(1, (self.config.max_message_bytes - 4096) // row_bytes)
        return max(1, min(requested or self.config.export_chunk_rows, self.config.max_ids_per_request, fitting))


def _apply_chunk(table: EmbeddingTable, rows: RowBatch, deleted_ids: np.ndarray, version: int) -> tuple[int, int]:
    """Deletions first, then upserts: an id deleted and re-created after `since` ends up present."""
    deleted = table.delete(deleted_ids, version) if deleted_ids.shape[0] else 0
    if rows.ids.shape[0]:
        table.upsert(rows, version)
    return int(rows.ids.shape[0]), deleted


def _changes(table: EmbeddingTable, since: int, include_state: bool) -> tuple[RowBatch, np.ndarray]:
    try:
        return table.changes_since(since, include_state)
    except LookupError as exc:
        raise FailedPrecondition(str(exc)) from None


def _deleted(table: EmbeddingTable, since: int) -> np.ndarray:
    if since <= 0:
        return np.zeros(0, np.int64)
    try:
        return table.deleted_since(since)
    except LookupError as exc:
        raise FailedPrecondition(str(exc)) from None


def _slices(rows: RowBatch, step: int) -> Iterator[RowBatch]:
    for start in range(0, rows.ids.shape[0], step):
        stop = start + step
        yield RowBatch(rows.ids[start:stop], rows.values[start:stop], rows.update_times[start:stop])


def _empty_rows(table: EmbeddingTable, include_state: bool) -> RowBatch:
    width = table.width if include_state else table.dim
    return RowBatch(np.zeros(0, np.int64), np.zeros((0, width), np.float32), np.zeros(0, np.uint32))
