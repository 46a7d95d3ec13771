"""Rows a serving shard keeps although its training shard no longer has them.

A rollback is an internal recovery step: the controller restores every training shard to
the last cut, and the rows created after it are gone from training until the trainers
replay the samples after the cut and create them again. A serving shard that followed the
rollback to the letter would stop serving those ids in the meantime, so serving would get
worse than it was because training recovered. Instead, when a full copy of a new training
incarnation lacks rows this shard holds, the rows stay (served as they were) and are
recorded here. Each leaves the ledger when training speaks of its id again (an upsert: the
replay re-created it; a deletion: applied as usual) or, for a table with `expire_after`,
once the training table's data clock passes its update time by that much, when it is
deleted: exactly when training would have expired it.
"""

from __future__ import annotations

import math

import numpy as np


class RetainedRows:
    """The retained ids of each table, with the update time each had when retained.

    Kept sorted by id, so checking a sync's ids against the ledger is a binary search.
    """

    def __init__(self) -> None:
        self._ids: dict[str, np.ndarray] = {}
        self._times: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return sum(ids.shape[0] for ids in self._ids.values())

    def ids(self, table: str) -> np.ndarray:
        """The retained ids of `table` (sorted; empty if none)."""
        return self._ids.get(table, np.zeros(0, np.int64))

    def retain(self, table: str, ids: np.ndarray, update_times: np.ndarray) -> None:
        """Records rows kept although training lacks them (an id already retained keeps its new time)."""
        if ids.shape[0] == 0:
            return
        all_ids = np.concatenate([ids.astype(np.int64), self.ids(table)])
        all_times = np.concatenate([update_times.astype(np.uint32), self._times.get(table, np.zeros(0, np.uint32))])
        unique, first = np.unique(all_ids, return_index=True)  # the first occurrence: the new time
        self._ids[table], self._times[table] = unique, all_times[first]

    def forget(self, table: str, ids: np.ndarray) -> None:
        """Drops ids training spoke of again (re-created, or deleted by a sync)."""
        held = self._ids.get(table)
        if held is None or ids.shape[0] == 0:
            return
        keep = ~np.isin(held, ids)
        if keep.all():
            return
        if not keep.any():
            del self._ids[table], self._times[table]
            return
        self._ids[table], self._times[table] = held[keep], self._times[table][keep]

    def expired(self, table: str, clock: float, expire_after: float) -> np.ndarray:
        """The retained ids training would have expired by now, as its sweep decides.

        Args:
            table: the table.
            clock: the training table's data clock (its newest update time), seconds.
            expire_after: the table's expiry, seconds.

        Returns:
            The ids last updated before `clock - expire_after` (the sweep's cutoff); they are
            still in the ledger: `forget` them once deleted.
        """
        times = self._times.get(table)
        if times is None or clock <= 0:
            return np.zeros(0, np.int64)
        cutoff = max(0, math.floor(clock - expire_after) + 1)
        return self._ids[table][times < cutoff]
