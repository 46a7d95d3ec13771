"""A partition's join saved incrementally: a base, and the deltas after it.

Objects of partition p in the state store (`monolith.streams.state_store`):
- `partition-<p>`: the base, a whole `JoinState` (`PartitionJoin.snapshot`) with its
  number (`JoinState.base`).
- `partition-<p>.delta.<k>`: the k-th delta after that base (`PartitionJoin.delta`: the keys
  changed and forgotten since the snapshot before), k = 1, 2, ..., carrying the number of
  the base it follows.

Cost. A save writes one delta, as large as what changed since the previous save: O(rate x
interval), not O(keys remembered). When the deltas since the base would add up to more
than COMPACTION_RATIO times what a new base would weigh (the join's keys at the bytes per
key record written so far), the save writes a new base instead (a compaction) and deletes the old
base's deltas; so a base of B bytes is written only after about 4B bytes of deltas, and the
bytes written per event stay O(1) amortized (about 1.25 times the deltas'), and a load
reads about 5 times the state at most. Nothing scans every key but a compaction, and it is
built in parts with the event loop free between them (the partition's own join waits; the
others and ReportActions go on). Measured against the new base, not the old one, a state
that only grows (a window filling up under load) is not compacted: its deltas are mostly
its own keys, written once, and a compaction would rewrite them all while the partition
waits (3.4 s for 1.2 million keys, 142 MB, on a quiet machine).

Load: the base, then deltas 1, 2, ... while each exists and carries the base's number;
`PartitionJoin.restore` applies them in order.

A crash at any point leaves a state that loads, and what loads is a state the join was in
when it was saved:
- `put` replaces an object whole: a reader sees the old one or the new one.
- Delta k is written only once deltas 1..k-1 of its base are (each put is awaited): the
  deltas of a base are contiguous from 1, and load reads them up to the last one stored.
- A compaction writes the new base (numbered one more) before deleting anything; the new
  base's deltas come after it. A delta left from an older base (a compaction that crashed
  while deleting) carries another number, so load stops there (such a delta is ignored,
  then overwritten by the new base's delta of the same k, or deleted by the next
  compaction: deletion runs from the highest k down, so what a crash leaves of it is
  1..j, and the next compaction deletes upwards past its own deltas while they exist).
- A base of a release without deltas is base 0 with no deltas: it loads as before.

A snapshot is saved only once every sample decided by the events it covers is stored on
SAMPLES; it records where SAMPLES stood then (`samples_seq`, see partition).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.joiner import metrics
from monolith.joiner.config import JoinerConfig
from monolith.joiner.window import PartitionJoin
from monolith.streams.state_store import StateStore


COMPACTION_RATIO = 4  # a new base once the deltas since the last one outweigh a new base this many times


async def _serialized(parts: Iterator[pb.JoinState], trailer: pb.JoinState) -> tuple[bytes, int]:
    """The parts' bytes joined, then the trailer's: one JoinState (a message's fields may come in
    any order, and repeated ones accumulate), and the keys in it. Yields to the event loop
    between parts, so other partitions and ReportActions go on while a large state is written out."""
    chunks = []
    keys = 0
    for part in parts:
        chunks.append(part.SerializeToString())
        keys += len(part.keys)
        await asyncio.sleep(0)
    chunks.append(trailer.SerializeToString())
    return b"".join(chunks), keys


class Snapshots:
    """The saved join of one partition. `load` first, then `save` now and then.

    Args:
        store: the state store bucket.
        partition: the partition index.
    """

    def __init__(self, store: StateStore, partition: int) -> None:
        self._store = store
        self._label = str(partition)
        self._base_name = f"partition-{partition}"
        self._base = 0  # the number of the base loaded or written last
        self._base_bytes = 0
        self._written_bytes = 0  # bytes of key records written (bases and deltas), and their keys
        self._written_keys = 0
        self._deltas = 0  # deltas stored after that base
        self._delta_bytes = 0

    def _delta_name(self, k: int) -> str:
        return f"{self._base_name}.delta.{k}"

    async def load(self, config: JoinerConfig) -> tuple[PartitionJoin, int | None]:
        """The saved join (a fresh one if nothing is saved), and its `samples_seq`.

        Returns:
            The join, and the SAMPLES sequence saved with it: 0 if nothing is saved, None
            for a snapshot of a release that published one sample at a time (it saved none).

        Raises:
            One of TRANSIENT_ERRORS: NATS is away.
        """
        data = await self._store.get(self._base_name)
        if data is None:
            base, samples_seq = pb.JoinState(), 0
        else:
            base = pb.JoinState.FromString(data)
            samples_seq = base.samples_seq if base.HasField("samples_seq") else None
        deltas: list[pb.JoinState] = []
        delta_bytes = 0
        while (found := await self._store.get(self._delta_name(len(deltas) + 1))) is not None:
            delta = pb.JoinState.FromString(found)
            if delta.base != base.base:
                break  # left from an older base
            deltas.append(delta)
            delta_bytes += len(found)
            samples_seq = delta.samples_seq
        self._base, self._base_bytes = base.base, len(data or b"")
        self._written_bytes = self._base_bytes + delta_bytes
        self._written_keys = len(base.keys) + sum(len(d.keys) for d in deltas)
        self._deltas, self._delta_bytes = len(deltas), delta_bytes
        return PartitionJoin.restore(config, base, deltas), samples_seq

    async def save(self, join: PartitionJoin, samples_seq: int) -> None:
        """Saves what changed in `join` since the last save or load (see the module docstring).

        Args:
            join: the join `load` returned, fed events since.
            samples_seq: the SAMPLES stream sequence of the partition's last sample stored.

        Raises:
            One of TRANSIENT_ERRORS: NATS is away (the caller restarts from `load`).
        """
        trailer = pb.JoinState(base=self._base, delta=self._deltas + 1, samples_seq=samples_seq)
        data, keys = await _serialized(join.delta_parts(), trailer)
        self._written_bytes, self._written_keys = self._written_bytes + len(data), self._written_keys + keys
        if self._delta_bytes + len(data) > COMPACTION_RATIO * max(self._base_bytes, self._new_base_bytes(join)):
            await self._compact(join, samples_seq)
            return
        await self._store.put(self._delta_name(self._deltas + 1), data)
        self._deltas, self._delta_bytes = self._deltas + 1, self._delta_bytes + len(data)
        metrics.SNAPSHOT_BYTES.labels(self._label, "delta").inc(len(data))

    def _new_base_bytes(self, join: PartitionJoin) -> float:
        """About what a base of `join` would weigh now: its keys at the bytes per key record written so far."""
        return self._written_bytes / max(self._written_keys, 1) * join.remembered

    async def _compact(self, join: PartitionJoin, samples_seq: int) -> None:
        """Writes a new base, then deletes the deltas of the old one."""
        number = self._base + 1
        data, keys = await _serialized(join.snapshot_parts(), pb.JoinState(base=number, samples_seq=samples_seq))
        self._written_bytes, self._written_keys = self._written_bytes + len(data), self._written_keys + keys
        await self._store.put(self._base_name, data)
        metrics.SNAPSHOT_BYTES.labels(self._label, "base").inc(len(data))
        self._base, self._base_bytes = number, len(data)
        top = self._deltas
        self._deltas, self._delta_bytes = 0, 0
        # Past the old base's deltas: what an earlier compaction left when it crashed deleting.
        while await self._store.exists(self._delta_name(top + 1)):
            top += 1
        for k in range(top, 0, -1):
            await self._store.delete(self._delta_name(k))
