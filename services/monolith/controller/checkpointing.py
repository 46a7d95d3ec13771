"""Consistent checkpoints of the training shards, the dense-PS and the trainers' stream position.

**The cut.** Trainers acknowledge a step's samples only after its gradients are applied.
The controller pauses every trainer between two steps (`TrainerControl.Pause`), then
waits until the consumer shows no sample delivered and unacknowledged. At that instant
every delivered sample is applied and acknowledged, so the acknowledgement floor F is an
exact position: the parameter servers hold the effect of the samples up to F (minus bad
ones, terminated) and of nothing after it. That position, with the state that holds
exactly it, is the cut. The controller exports every training shard (rows changed since
the last checkpoint, with optimizer state, or all of them) and snapshots the dense-PS while
the trainers stay paused, resumes them, and only then writes the files and, last, the
manifest holding F.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as eps_pb
from monolith.checkpoint.errors import CheckpointNotFound
from monolith.checkpoint.manifest import Manifest
from monolith.checkpoint.store import CheckpointStore
from monolith.common.errors import FailedPrecondition, Unavailable
from monolith.controller import metrics
from monolith.controller.parameter_servers import ParameterServers
from monolith.controller.settings import ControllerSettings
from monolith.controller.trainers import TrainerFleet
from monolith.dense_ps.store import DenseSnapshot
from monolith.embedding_ps.chunks import Chunk
from monolith.streams.pull_consumer import ConsumerState

_LOGGER = logging.getLogger("monolith.controller")


@dataclasses.dataclass(frozen=True)
class Exported:
    """One shard's export, held in memory until written."""

    incarnation: str
    since: int
    version: int
    chunks: list[Chunk]


class _FallBackToFull(Exception):
    """An incremental export is impossible (the shard forgot deletions that old)."""


class Checkpointer:
    """Takes checkpoints of one training cluster (see the module docstring).

    Args:
        store: where checkpoints go.
        servers: the training shards, the dense-PS and the consumer.
        trainers: the trainers to pause for the cut.
        settings: how often a checkpoint is full, how many are kept, the drain timeout.
        lock: held for a whole checkpoint; recovery holds it too (one at a time).
    """

    def __init__(self, store: CheckpointStore, servers: ParameterServers, trainers: TrainerFleet,
                 settings: ControllerSettings, lock: threading.RLock) -> None:  # fmt: skip
        self.store = store
        self._servers = servers
        self._trainers = trainers
        self._settings = settings
        self._lock = lock
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, servers.num_shards),
                                                           thread_name_prefix="ctl-export")  # fmt: skip
        self._since_full = 0
        self.last_checkpoint: Manifest | None = None

    def next_full(self) -> None:
        """Makes the next checkpoint a full one (after a restore: the shards' versions restarted)."""
        self._since_full = self._settings.full_every

    def checkpoint(self, full: bool = False) -> Manifest:
        """Takes one consistent checkpoint.

        Raises:
            Unavailable: a part is down or awaiting a restore, a trainer did not pause, or
                delivered samples stayed unacknowledged; nothing is written.
        """
        with self._lock:
            stats = self._servers.shard_stats()
            waiting = [i for i, s in enumerate(stats) if s.awaiting_restore]
            if waiting:
                raise Unavailable(f"training shard(s) {waiting} await a restore; no checkpoint of them")
            parent = self._incremental_parent(stats, full)
            asked = time.monotonic()
            self._trainers.pause()
            # Training stops from here (each trainer held between steps) until resumed;
            # waiting for a step in progress (or an idle fetch) to end did not stop it.
            started = time.monotonic()
            try:
                position = self._servers.drained_position(self._settings.drain_timeout)
                exported = self._export_all(parent)
                dense = self._servers.dense.snapshot()
                dense_incarnation = self._servers.dense.stats().incarnation
            finally:
                self._trainers.resume(rolled_back=False)
            pause = time.monotonic() - started
            manifest = self._write(parent, exported, dense, dense_incarnation, position, pause)
            self._since_full = 0 if manifest.kind == "full" else self._since_full + 1
            self.last_checkpoint = manifest
            metrics.CHECKPOINTS.labels(manifest.kind).inc()
            metrics.PAUSE_SECONDS.observe(pause)
            metrics.LAST_PAUSE_SECONDS.set(pause)
            metrics.LAST_CHECKPOINT.set(time.time())
            _LOGGER.info(
                "checkpoint %s (%s): %d rows, %d deletions, stream position %s, training paused %.3f s (%.3f s "
                "waiting for steps to end)",
                manifest.id, manifest.kind, sum(s.rows for s in manifest.shards), sum(s.deleted for s in manifest.shards),
                manifest.stream.get("ack_floor", "-"), pause, started - asked,
            )  # fmt: skip
            self.store.retain(self._settings.keep_full)
            return manifest

    def _incremental_parent(self, stats: list[eps_pb.StatsResponse], full: bool) -> Manifest | None:
        """The checkpoint an incremental one can follow, or None (take a full one)."""
        if full or self._since_full + 1 >= self._settings.full_every:
            return None
        try:
            last = self.store.load()
        except CheckpointNotFound:
            return None
        if last.num_shards != self._servers.num_shards:
            return None
        if any(s.incarnation != e.incarnation or s.version < e.version for s, e in zip(stats, last.shards)):
            return None  # a shard restarted or was restored since: its versions mean nothing against the last
        return last

    def _export_all(self, parent: Manifest | None) -> list[Exported]:
        def one(index: int) -> Exported:
            since = parent.shards[index].version if parent else 0
            try:
                return self._export(index, since)
            except FailedPrecondition as exc:
                if since:
                    raise _FallBackToFull(str(exc)) from None
                raise

        shards = range(self._servers.num_shards)
        try:
            return list(self._pool.map(one, shards))
        except _FallBackToFull as exc:
            _LOGGER.info("incremental export impossible (%s); taking a full checkpoint", exc)
            return list(self._pool.map(lambda i: self._export(i, 0), shards))

    def _export(self, index: int, since: int) -> Exported:
        shard = self._servers.shards[index]
        chunks, version, incarnation = [], since, ""
        for chunk in shard.export(since, include_optimizer_state=True):
            chunks.append(chunk)
            version, incarnation = chunk.version, chunk.incarnation
        if not incarnation:  # nothing exported: the version and incarnation come from Stats
            stats = shard.stats()
            version, incarnation = (stats.version if since == 0 else since), stats.incarnation
        return Exported(incarnation, since, version, chunks)

    def _write(self, parent: Manifest | None, exported: list[Exported], dense: DenseSnapshot, dense_incarnation: str,
               position: ConsumerState | None, pause: float) -> Manifest:  # fmt: skip
        writer = self.store.begin("incremental" if parent else "full", self._servers.num_shards, parent)
        for index, e in enumerate(exported):
            with writer.shard(index, e.incarnation, e.since) as out:
                for chunk in e.chunks:
                    out.write(chunk.table, chunk.rows, chunk.deleted_ids)
                out.version = e.version
        writer.write_dense(dense.version, dense_incarnation, dense.tensors, dict(dense.optimizer_state))
        stream: dict[str, Any] = {}
        consumer = self._servers.consumer
        if position is not None and consumer is not None:
            stream = {"stream": consumer.settings.stream, "consumer": consumer.settings.durable,
                      "ack_floor": position.ack_floor, "delivered": position.delivered}  # fmt: skip
        return writer.commit(stream=stream, pause_seconds=pause)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
