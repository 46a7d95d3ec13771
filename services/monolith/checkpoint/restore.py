"""Reading a checkpoint chain back as the rows each of M shards should hold.

A chain is one full checkpoint and the incrementals after it. Per table, the full
checkpoint's rows (over every shard) are the starting state; each incremental then
deletes its deleted ids and upserts its rows, in order, exactly as the shards applied
those changes. The result is routed to its owners among `num_shards` shards with the
caller's routing function (the embedding-PS's own), so a checkpoint of N shards restores
onto any M: resharding is a restore.

The merged state of a table is held in memory while it is routed (one table at a time).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np

from monolith.checkpoint.errors import CheckpointError
from monolith.checkpoint.manifest import Manifest
from monolith.checkpoint.store import CheckpointStore
from monolith.embedding.table import RowBatch

Route = Callable[[str, np.ndarray, int], np.ndarray]
"""(table, int64 ids, number of shards) -> each id's owning shard."""


@dataclasses.dataclass
class _TableState:
    ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    values: list[np.ndarray] = dataclasses.field(default_factory=list)
    times: list[np.ndarray] = dataclasses.field(default_factory=list)

    def batch(self, width: int) -> RowBatch:
        if not self.ids:
            return RowBatch(np.zeros(0, np.int64), np.zeros((0, width), np.float32), np.zeros(0, np.uint32))
        return RowBatch(np.concatenate(self.ids), np.concatenate(self.values), np.concatenate(self.times))


def merged_tables(store: CheckpointStore, chain: Sequence[Manifest]) -> dict[str, RowBatch]:
    """Every table's rows as of the last checkpoint of `chain` (full first), ids unique.

    Raises:
        CheckpointError: a file is damaged, or a table's row width changes along the chain.
    """
    state: dict[str, RowBatch] = {}
    widths: dict[str, int] = {}
    for manifest in chain:
        upserts: dict[str, _TableState] = {}
        deletions: dict[str, list[np.ndarray]] = {}
        for index in range(manifest.num_shards):
            for frame in store.shard_frames(manifest, index):
                name, rows = frame.table, frame.rows
                if rows.ids.shape[0]:
                    width = widths.setdefault(name, rows.values.shape[1])
                    if rows.values.shape[1] != width:
                        raise CheckpointError(
                            f"checkpoint {manifest.id}: table {name!r} rows of width {rows.values.shape[1]}, "
                            f"earlier {width}"
                        )
                    part = upserts.setdefault(name, _TableState())
                    part.ids.append(rows.ids)
                    part.values.append(rows.values)
                    part.times.append(rows.update_times)
                if frame.deleted_ids.shape[0]:
                    deletions.setdefault(name, []).append(frame.deleted_ids)
        for name in sorted(set(upserts) | set(deletions)):
            width = widths.get(name, 0)
            current = state[name] if name in state else _TableState().batch(width)
            new = upserts[name].batch(width) if name in upserts else _TableState().batch(width)
            new = _last_of_each_id(new)
            gone = np.concatenate([*deletions.get(name, []), new.ids])
            keep = ~np.isin(current.ids, gone)
            state[name] = RowBatch(
                np.concatenate([current.ids[keep], new.ids]),
                np.concatenate([current.values[keep].reshape(-1, width), new.values.reshape(-1, width)]),
                np.concatenate([current.update_times[keep], new.update_times]),
            )
    return state


def _last_of_each_id(rows: RowBatch) -> RowBatch:
    """Rows with each id once, keeping its last occurrence (an export read while rows moved)."""
    if rows.ids.shape[0] < 2:
        return rows
    reversed_ids = rows.ids[::-1]
    _, first = np.unique(reversed_ids, return_index=True)
    keep = np.sort(rows.ids.shape[0] - 1 - first)
    if keep.shape[0] == rows.ids.shape[0]:
        return rows
    return RowBatch(rows.ids[keep], rows.values[keep], rows.update_times[keep])


@dataclasses.dataclass(frozen=True)
class ShardRows:
    """One table's rows for one target shard."""

    table: str
    rows: RowBatch


def restore_plan(
    store: CheckpointStore, chain: Sequence[Manifest], num_shards: int, route: Route, max_rows: int = 65_536
) -> list[list[ShardRows]]:
    """The rows each of `num_shards` shards should hold, in chunks of at most `max_rows`.

    Args:
        store: where the chain is.
        chain: a full checkpoint and its incrementals, in order (`CheckpointStore.chain`).
        num_shards: shards to restore onto (the checkpoint's count, or another: resharding).
        route: the embedding-PS's routing of (table, ids) to shards.
        max_rows: rows per chunk.

    Returns:
        Per target shard, its chunks.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    plan: list[list[ShardRows]] = [[] for _ in range(num_shards)]
    for name, rows in merged_tables(store, chain).items():
        owners = route(name, rows.ids, num_shards)
        for shard in range(num_shards):
            mine = np.flatnonzero(owners == shard)
            for start in range(0, mine.shape[0], max_rows):
                take = mine[start : start + max_rows]
                plan[shard].append(ShardRows(name, RowBatch(rows.ids[take], rows.values[take], rows.update_times[take])))
    return plan


def iter_rows(plan_for_shard: Sequence[ShardRows]) -> Iterator[tuple[str, RowBatch]]:
    """(table, rows) of one shard's plan."""
    for chunk in plan_for_shard:
        yield chunk.table, chunk.rows
