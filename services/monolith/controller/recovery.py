"""Recovery: noticing that a part restarted, and rolling every parameter server back to one cut.

When a training shard or the dense-PS restarts (it comes back awaiting a restore, or with
a new incarnation) or a trainer restarts while samples were delivered and not
acknowledged (it may have died mid-step, with part of its gradients applied), the
controller pauses the trainers, restores every training shard (the checkpoint's full rows
plus its incrementals, routed to their owners among the shards there are now) and the
dense-PS, recreates the consumer to deliver from the cut's position F + 1, and resumes the
trainers, which subscribe again and pull the dense parameters in full. Every parameter
server is back at the cut and the samples after it are replayed in stream order: none
lost, none applied twice. A trainer that restarted with nothing unacknowledged died between
steps: the state is consistent and it is simply resumed.

A new controller (or a new leader) first adopts the cluster as it finds it when nothing is
half applied; otherwise it restores.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence

import grpc

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as eps_pb
from monolith.checkpoint.errors import CheckpointNotFound
from monolith.checkpoint.manifest import Manifest
from monolith.checkpoint.restore import ShardRows, iter_rows, restore_plan
from monolith.checkpoint.store import CheckpointStore
from monolith.common.errors import FailedPrecondition, MonolithError
from monolith.controller import metrics
from monolith.controller.checkpointing import Checkpointer
from monolith.controller.parameter_servers import ParameterServers, route
from monolith.controller.trainers import TrainerFleet
from monolith.dense_ps.store import DenseSnapshot

_LOGGER = logging.getLogger("monolith.controller")


class Recovery:
    """Watches the parts of one training cluster and rolls it back to a cut when needed.

    Args:
        store: where the checkpoints are.
        servers: the training shards, the dense-PS and the consumer.
        trainers: the trainers to pause during a rollback.
        checkpointer: told to take a full checkpoint next after a restore.
        lock: held for a whole restore; checkpoints hold it too (one at a time).

    Attributes:
        adopted: whether the cluster as it is now was restored or adopted by this
            controller (False until then, and again when it loses the leadership).
    """

    def __init__(self, store: CheckpointStore, servers: ParameterServers, trainers: TrainerFleet,
                 checkpointer: Checkpointer, lock: threading.RLock) -> None:  # fmt: skip
        self.store = store
        self._servers = servers
        self._trainers = trainers
        self._checkpointer = checkpointer
        self._lock = lock
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, servers.num_shards),
                                                           thread_name_prefix="ctl-restore")  # fmt: skip
        # What the parameter servers were when last checked consistent: a change means a restart.
        self._expected_shards: list[str | None] = [None] * servers.num_shards
        self._expected_dense: str | None = None
        self.adopted = False

    def restore(self, checkpoint_id: str | None = None, reason: str = "requested") -> Manifest | None:
        """Rolls every training shard, the dense-PS and the trainers back to a checkpoint.

        Without any checkpoint (a new cluster) the cut is the empty state at stream
        position 0: the shards and the dense-PS are released empty and the trainers read
        the stream from its start.

        Returns:
            The checkpoint restored (the last of its chain), or None for the empty cut.

        Raises:
            CheckpointNotFound, CheckpointError: no such checkpoint, or a damaged one.
            FailedPrecondition: the shards are not the cluster the controller was given.
            Unavailable: a part is down; retry.
        """
        with self._lock:
            started = time.monotonic()
            try:
                chain = self.store.chain(checkpoint_id)
            except CheckpointNotFound:
                if checkpoint_id is not None:
                    raise
                chain = []
            num_shards = self._servers.num_shards
            for i, s in enumerate(self._servers.shard_stats()):
                if (s.shard, s.num_shards) != (i, num_shards):
                    raise FailedPrecondition(
                        f"{self._servers.shard_addresses[i]} is shard {s.shard} of {s.num_shards}; the controller was "
                        f"given {num_shards} shard(s) in order, this one as shard {i}"
                    )
            last = chain[-1] if chain else None
            if last is not None and last.num_shards != num_shards:
                _LOGGER.info("resharding %s from %d to %d shard(s)", last.id, last.num_shards, num_shards)
            self._trainers.pause(best_effort=True)
            before = self._servers.position()  # what was applied and acknowledged, some of it after the cut
            plan = restore_plan(self.store, chain, num_shards, route) if chain else [[] for _ in range(num_shards)]
            responses = list(self._pool.map(lambda i: self._restore_shard(i, plan[i]), range(num_shards)))
            dense = self.store.dense(last) if last is not None else None
            self._servers.dense.restore(DenseSnapshot(dense[0], dense[1], dense[2]) if dense else None)
            position = int(last.stream.get("ack_floor", 0)) if last is not None else 0
            if self._servers.consumer is not None:
                self._servers.consumer.rewind(position)
                metrics.RESUME_POSITION.set(position)
                if before is not None:
                    metrics.ROLLED_BACK.inc(max(0, before.ack_floor - position))
            self._expected_shards = [r.incarnation for r in responses]
            self._expected_dense = self._servers.dense.stats().incarnation
            self._checkpointer.next_full()  # the shards' versions restarted with their incarnations
            self._trainers.resume(rolled_back=True, check_in=True)
            self.adopted = True
            seconds = time.monotonic() - started
            metrics.RESTORES.labels(reason).inc()
            metrics.LAST_RESTORE_SECONDS.set(seconds)
            _LOGGER.info(
                "restored %s (%s) onto %d shard(s) in %.2f s; trainers resume after stream sequence %d",
                last.id if last else "the empty state", reason, num_shards, seconds, position,
            )  # fmt: skip
            return last

    def _restore_shard(self, index: int, plan: Sequence[ShardRows]) -> eps_pb.RestoreResponse:
        return self._servers.shards[index].restore(iter_rows(plan))

    def watch_once(self) -> str | None:
        """Checks every part once and recovers what needs it; returns what was done (None: nothing).

        A part that does not answer is skipped this round: it is restarting, and is
        checked again at the next.
        """
        with self._lock:
            reason = self._restart_seen()
            if reason is None:
                return None
            if reason == "trainer":
                # A trainer restarted: roll back only if it may have died mid-step.
                self._trainers.pause(best_effort=True)
                position = self._servers.position()
                if position is not None and position.ack_pending == 0:
                    metrics.RESUME_POSITION.set(position.ack_floor)
                    self._trainers.resume(rolled_back=False, check_in=True)
                    _LOGGER.info("a trainer restarted between steps (nothing unacknowledged): resumed it")
                    return "resumed a restarted trainer"
                reason = "trainer restarted with samples unacknowledged"
            elif not self.adopted and reason == "adopt":
                self._trainers.pause(best_effort=True)
                position = self._servers.position()
                if position is None or position.ack_pending == 0:
                    if position is not None:
                        metrics.RESUME_POSITION.set(position.ack_floor)
                    self._adopt()
                    self._trainers.resume(rolled_back=False, check_in=True)
                    return "adopted the running cluster"
                reason = "controller started with samples unacknowledged"
            _LOGGER.warning("recovering: %s", reason)
            self.restore(reason=reason.split(" ")[0])
            return f"restored ({reason})"

    def _restart_seen(self) -> str | None:
        """Why a recovery is needed ("training shard 0 ...", "dense-PS ...", "trainer", "adopt"), or None."""
        try:
            stats = self._servers.shard_stats()
            dense = self._servers.dense.stats()
        except (grpc.RpcError, MonolithError):
            return None
        for i, s in enumerate(stats):
            if s.awaiting_restore:
                return f"training shard {i} awaits a restore"
        if dense.awaiting_restore:
            return "dense-PS awaits a restore"
        if not self.adopted:
            return "adopt"
        for i, s in enumerate(stats):
            if s.incarnation != self._expected_shards[i]:
                return f"training shard {i} changed incarnation (restarted without --restore-required?)"
        if dense.incarnation != self._expected_dense:
            return "dense-PS changed incarnation"
        if self._trainers.restarted():
            return "trainer"
        return None

    def _adopt(self) -> None:
        self._expected_shards = [s.incarnation for s in self._servers.shard_stats()]
        self._expected_dense = self._servers.dense.stats().incarnation
        self.adopted = True

    def close(self) -> None:
        self._pool.shutdown(wait=True)
