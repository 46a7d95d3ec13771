"""What changed in one table after a version: the change log's marks and the deletion log.

Why a log of rows. An export since version S lists every row changed after S. Rows carry
no version: a version per row would make that export a scan of the whole arena, O(table)
however little changed. Instead the table's kernels append the row of every creation,
update and import to a change log (`TableArrays.log`, its length in `meta[META_LOG]`),
one int32 store in the pass that changes the row, so the hot paths pay next to nothing.
Every live row appears in the log at least once, so the log read from 0 is the table.

Marks make an export since any version O(changes). A mark records (version, change-log
position, deletion-log position). When a mutation arrives with a version above every
version the table has seen, a mark is recorded first, at the newest version seen so far:
every entry before it came from a mutation numbered at most that, whatever order
concurrent mutations arrive in. So the changes after version S lie at or after the
positions of the newest mark at or below S (one binary search), or nowhere if S is at
least the newest version seen. Such an export may repeat a few rows changed at or before
S (mutations may arrive out of order; marks are thinned as they age), never misses one,
provided every mutation numbered up to S had been applied when the consumer's copy was
taken (a shard's export guarantees it for the version it reports). Mark records are
bounded (MAX_MARKS): when full, every other one of the older half is dropped, and an
export since a dropped mark starts from the mark before it, which only resends more.

Compaction and remapping. A row changed often appears often, so when the log grows past
twice the live rows (plus LOG_SLACK) it is compacted in place to the last entry of each
live row, in order (`table_kernels.compact_log`): amortized O(1) per appended entry. Mark
positions are remapped to the number of entries kept before them; the entries kept after
a mark are the last changes of exactly the rows changed after it, so a mark keeps meaning
the same changes. Only mutations that append compact: an expiry window or a deletion
never pays for it, so a sweep's write-locked steps stay short.

Deletions. A freed row leaves nothing usable in the change log (its entries are
skipped), so deleted ids (expired, or deleted by import) go to a deletion log of (id,
version), positioned by the same marks. It is bounded (MAX_DELETION_LOG): when full, the
older half is forgotten and the deletion floor rises to the newest version forgotten; a
consumer asking for deletions since a version below the floor gets a LookupError and
needs a full export instead. Growing the deletion log faults in fresh pages, tens of
milliseconds for a large one, so an expiry sweep has a filled spare made outside the
table's lock (`deletion_spare`) and publishes it under the write lock (`publish_spare`);
the write-locked step that outgrows the log then only copies into it.

Locking: a ChangeLog has no lock of its own. The owning table's readers-writer lock
protects it together with the table's arrays: reads under the shared lock, everything
else under the exclusive one, except `deletion_spare`, which only allocates.
"""

from __future__ import annotations

import numpy as np

from monolith.embedding import id_map, table_kernels
from monolith.embedding.table_kernels import META_LOG, TableArrays

MAX_DELETION_LOG = 1 << 20  # deletions remembered per table; older ones need a full export
MAX_MARKS = 1024  # mark records kept per table; older ones are thinned (exports then resend more)
LOG_SLACK = 65_536  # the change log is compacted when longer than 2 x live rows + this


class ChangeLog:
    """The mark records and the deletion log of one table, over the change log in its arrays.

    The table owns the change-log array (it grows it with its other arrays, and its
    kernels append to it); methods that read or compact it take the table's arrays.

    Args:
        table_name: the table's name, for error messages.
    """

    def __init__(self, table_name: str) -> None:
        self._table_name = table_name

        self._deleted_ids = np.zeros(0, dtype=np.int64)
        self._deleted_versions = np.zeros(0, dtype=np.int64)
        self._num_deleted = 0
        self._deletions_floor = 0  # deletions at or below this version were forgotten
        self._spare_deletions: tuple[np.ndarray, np.ndarray] | None = None  # see deletion_spare

        # Mark records, oldest first: versions ascending, positions non-decreasing.
        self._mark_versions = np.zeros(MAX_MARKS, dtype=np.int64)
        self._mark_log = np.zeros(MAX_MARKS, dtype=np.int64)
        self._mark_deletions = np.zeros(MAX_MARKS, dtype=np.int64)
        self._num_marks = 0
        self._newest_version = 0  # the highest version of a mutation seen

    @property
    def deletions_floor(self) -> int:
        """Deletions at or below this version were forgotten."""
        return self._deletions_floor

    @property
    def nbytes(self) -> int:
        """Bytes held by the mark records and the deletion log (with its spare)."""
        arrays = (
            self._deleted_ids, self._deleted_versions, self._mark_versions, self._mark_log, self._mark_deletions,
            *(self._spare_deletions or ()),
        )  # fmt: skip
        return sum(a.nbytes for a in arrays)

    # ------------------------------------------------------------- mutations

    def begin_mutation(self, t: TableArrays, version: int) -> None:
        """Records a mark before the first mutation of a version above all seen (write lock)."""
        if version > self._newest_version:
            self._record_mark(t, self._newest_version)
            self._newest_version = version

    def compact_if_long(self, t: TableArrays) -> None:
        """Compacts the change log in place if it is past twice the live rows (write lock).

        Each live row keeps its last entry; mark positions follow. Amortized O(1) per
        entry: at least live + LOG_SLACK entries were appended since the last time.
        """
        if int(t.meta[META_LOG]) > 2 * int(t.meta[id_map.META_LIVE]) + LOG_SLACK:
            positions = self._mark_log[: self._num_marks].copy()
            table_kernels.compact_log(t, positions)
            self._mark_log[: self._num_marks] = positions

    def log_deletions(self, ids: np.ndarray, version: int) -> None:
        """Appends deleted ids at `version`, forgetting the older half if full (write lock)."""
        n, k = self._num_deleted, ids.shape[0]
        if k == 0:
            return
        if n + k > MAX_DELETION_LOG and n >= 2:
            # Forget the older half so the log stays bounded; consumers that are further
            # behind than that get a full export instead.
            drop = n // 2
            self._deletions_floor = max(self._deletions_floor, int(self._deleted_versions[:drop].max()))
            n -= drop
            self._deleted_ids[:n] = self._deleted_ids[drop : drop + n]
            self._deleted_versions[:n] = self._deleted_versions[drop : drop + n]
            marks = self._mark_deletions[: self._num_marks]
            np.maximum(marks - drop, 0, out=marks)
        if n + k > self._deleted_ids.shape[0]:
            spare, self._spare_deletions = self._spare_deletions, None
            if spare is None or spare[0].shape[0] < n + k:
                capacity = max(n + k, 2 * self._deleted_ids.shape[0], 1024)
                spare = (np.empty(capacity, np.int64), np.empty(capacity, np.int64))
            spare[0][:n] = self._deleted_ids[:n]
            spare[1][:n] = self._deleted_versions[:n]
            self._deleted_ids, self._deleted_versions = spare
        self._deleted_ids[n : n + k] = ids
        self._deleted_versions[n : n + k] = version
        self._num_deleted = n + k

    def deletion_spare(self, extra: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A larger deletion log, its pages faulted in, if `extra` more deletions would need
        one and no spare is waiting; else None.

        Called without the lock: the sizes it reads are only a hint (`log_deletions`
        allocates anyway if the spare turns out too small). Hand the result to
        `publish_spare` under the write lock.
        """
        n, capacity = self._num_deleted, self._deleted_ids.shape[0]
        if n + extra <= capacity or n + extra > MAX_DELETION_LOG or self._spare_deletions is not None:
            return None
        size = max(n + extra, 2 * capacity, 1024)
        spare = (np.zeros(size, np.int64), np.zeros(size, np.int64))
        for array in spare:
            array.fill(0)  # np.zeros maps pages lazily; touch them here
        return spare

    def publish_spare(self, spare: tuple[np.ndarray, np.ndarray]) -> None:
        """Makes a filled spare from `deletion_spare` the next deletion log (write lock).

        Published only once filled, and under the lock `log_deletions` runs under, so a
        mutation never takes (and fills) a spare that is still being written.
        """
        if self._spare_deletions is None:
            self._spare_deletions = spare

    # ----------------------------------------------------------------- reads

    def changed_rows(self, t: TableArrays, since: int) -> np.ndarray:
        """Distinct live rows changed after `since`: O(log entries after its mark)."""
        start, _ = self.mark_for(t, since)
        return table_kernels.changed_rows(t, start, int(t.meta[META_LOG]))

    def deleted_since(self, t: TableArrays, since: int) -> np.ndarray:
        """Ids deleted after version `since`.

        Raises:
            LookupError: deletions after `since` were forgotten (below the floor).
        """
        if since < self._deletions_floor:
            raise LookupError(
                f"table {self._table_name!r} remembers deletions only after version {self._deletions_floor}, "
                f"not since {since}: a full export is needed"
            )
        _, start = self.mark_for(t, since)
        versions = self._deleted_versions[start : self._num_deleted]
        return self._deleted_ids[start : self._num_deleted][versions > since]

    def change_count(self, t: TableArrays, since: int) -> int:
        """Change-log and deletion-log entries after the mark of `since`. O(1)."""
        log_start, deletions_start = self.mark_for(t, since)
        return int(t.meta[META_LOG]) - log_start + self._num_deleted - deletions_start

    def mark_for(self, t: TableArrays, since: int) -> tuple[int, int]:
        """(change-log, deletion-log) positions from which every change after `since` lies."""
        if since <= 0:
            return 0, 0
        if since >= self._newest_version:
            return int(t.meta[META_LOG]), self._num_deleted
        i = int(np.searchsorted(self._mark_versions[: self._num_marks], since, side="right")) - 1
        if i < 0:
            return 0, 0
        return int(self._mark_log[i]), int(self._mark_deletions[i])

    # -------------------------------------------------------------- internal

    def _record_mark(self, t: TableArrays, version: int) -> None:
        """Records the log positions now as a mark at `version`."""
        n = self._num_marks
        if n == MAX_MARKS:
            # Thin the older half; an export since a dropped mark starts from the mark
            # before it, which only resends more.
            keep = np.concatenate([np.arange(0, n // 2, 2), np.arange(n // 2, n)])
            for array in (self._mark_versions, self._mark_log, self._mark_deletions):
                array[: keep.shape[0]] = array[keep]
            n = keep.shape[0]
        self._mark_versions[n] = version
        self._mark_log[n] = t.meta[META_LOG]
        self._mark_deletions[n] = self._num_deleted
        self._num_marks = n + 1
