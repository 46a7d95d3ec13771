"""Consistent checkpoints and recovery across the training shards, the dense-PS and the trainers.

**The cut.** Trainers acknowledge a step's samples only after its gradients are applied.
The controller pauses every trainer between two steps (`TrainerControl.Pause`), then
waits until the consumer shows no sample delivered and unacknowledged. At that instant
every delivered sample is applied and acknowledged, so the acknowledgement floor F is an
exact position: the parameter servers hold the effect of the samples up to F (minus bad
ones, terminated) and of nothing after it. The controller exports every training shard
(rows changed since the last checkpoint, with optimizer state, or all of them) and
snapshots the dense-PS while the trainers stay paused, resumes them, and only then
writes the files and, last, the manifest holding F.

**Recovery.** When a training shard or the dense-PS restarts (it comes back awaiting a
restore, or with a new incarnation) or a trainer restarts while samples were delivered
and not acknowledged (it may have died mid-step, with part of its gradients applied), the
controller pauses the trainers, restores every training shard (the checkpoint's full
rows + its incrementals, routed to their owners among the shards there are now) and the
dense-PS, recreates the consumer to deliver from F + 1, and resumes the trainers, which
subscribe again and pull the dense parameters in full. Every parameter server is back at
the cut and the samples after it are replayed in stream order: none lost, none applied
twice. A trainer that restarted with nothing unacknowledged died between steps: the
state is consistent and it is simply resumed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Annotated, Any, Callable, Iterator, Sequence

import grpc
import numpy as np
from pydantic import Field

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as eps_pb
from monolith.api.embedding_ps.v1 import embedding_ps_pb2_grpc as eps_grpc
from monolith.api.trainer.v1 import trainer_pb2 as tr_pb
from monolith.api.trainer.v1 import trainer_pb2_grpc as tr_grpc
from monolith.checkpoint.errors import CheckpointError, CheckpointNotFound
from monolith.checkpoint.manifest import Manifest
from monolith.checkpoint.restore import restore_plan
from monolith.checkpoint.store import CheckpointStore
from monolith.common.config import ConfigModel
from monolith.common.errors import FailedPrecondition, Unavailable
from monolith.common.wire import decode_array, encode_array
from monolith.controller import metrics
from monolith.controller.cluster import NORMAL, WARNING, ClusterView, LocalView
from monolith.dense_ps.client import DensePSClient
from monolith.dense_ps.store import DenseSnapshot
from monolith.embedding.hashing import stable_hash64
from monolith.embedding.table import RowBatch
from monolith.embedding_ps.routing import route_to_shards
from monolith.streams.pull_consumer import ConsumerAdmin, ConsumerState

_LOGGER = logging.getLogger("monolith.controller")
RPC_TIMEOUT = 5.0
EXPORT_TIMEOUT = 300.0
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class ControllerSettings(ConfigModel):
    """How often and how the controller checkpoints.

    Attributes:
        interval: seconds between periodic checkpoints.
        full_every: every this many checkpoints one is full; the others are incremental.
        keep_full: full checkpoints kept, each with its incrementals.
        pause_lease: seconds a trainer stays paused at most if the controller vanishes.
        pause_timeout: seconds to wait for a trainer to finish its step.
        drain_timeout: seconds to wait for delivered samples to be acknowledged at a cut.
        watch_interval: seconds between health checks of every part.
    """

    interval: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    full_every: Annotated[int, Field(ge=1)] = 10
    keep_full: Annotated[int, Field(ge=1)] = 2
    pause_lease: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    pause_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10.0
    drain_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 5.0
    watch_interval: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0


@dataclasses.dataclass(frozen=True)
class Exported:
    """One shard's export, held in memory until written."""

    incarnation: str
    since: int
    version: int
    chunks: list[tuple[str, RowBatch, np.ndarray]]


def route(table: str, ids: np.ndarray, num_shards: int) -> np.ndarray:
    """The embedding-PS's routing of a table's ids to shards."""
    return route_to_shards(ids, stable_hash64(table), num_shards)


class CheckpointController:
    """Checkpoints and restores one training cluster.

    Args:
        store: where checkpoints go.
        shards: "host:port" of every training embedding-PS shard, in shard order.
        dense: "host:port" of the dense-PS.
        trainers: "host:port" of every online trainer's TrainerControl.
        consumer: the trainers' shared consumer (None: no stream position is kept).
        settings: intervals and limits.
    """

    def __init__(self, store: CheckpointStore, shards: Sequence[str], dense: str, trainers: Sequence[str],
                 consumer: ConsumerAdmin | None, settings: ControllerSettings = ControllerSettings()) -> None:  # fmt: skip
        if not shards:
            raise ValueError("at least one training shard address is required")
        self.store = store
        self.settings = settings
        self.shard_addresses = list(shards)
        self.trainer_addresses = list(trainers)
        self._channels = [grpc.insecure_channel(a, options=list(_CHANNEL_OPTIONS)) for a in shards]
        self._shards = [eps_grpc.EmbeddingPSStub(c) for c in self._channels]
        self._dense = DensePSClient(dense, timeout=RPC_TIMEOUT, max_message_bytes=2**31 - 1,
                                    channel_options=_CHANNEL_OPTIONS[2:])  # fmt: skip
        self._trainer_channels = [grpc.insecure_channel(a, options=list(_CHANNEL_OPTIONS)) for a in trainers]
        self._trainers = [tr_grpc.TrainerControlStub(c) for c in self._trainer_channels]
        self._consumer = consumer
        self._lock = threading.RLock()  # one checkpoint or restore at a time
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, len(shards)), thread_name_prefix="ctl")
        # What the parts were when last checked consistent: a change means a restart.
        self._expected_shards: list[str | None] = [None] * len(shards)
        self._expected_dense: str | None = None
        self._expected_trainers: list[str | None] = [None] * len(trainers)
        self._since_full = 0
        self.adopted = False
        self.last_checkpoint: Manifest | None = None

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._dense.close()
        for channel in [*self._channels, *self._trainer_channels]:
            channel.close()
        if self._consumer is not None:
            self._consumer.close()

    # ------------------------------------------------------------ checkpoint

    def checkpoint(self, full: bool = False) -> Manifest:
        """Takes one consistent checkpoint (see the module docstring).

        Raises:
            Unavailable: a part is down or awaiting a restore, a trainer did not pause, or
                delivered samples stayed unacknowledged; nothing is written.
        """
        with self._lock:
            stats = self._shard_stats()
            waiting = [i for i, s in enumerate(stats) if s.awaiting_restore]
            if waiting:
                raise Unavailable(f"training shard(s) {waiting} await a restore; no checkpoint of them")
            parent = self._incremental_parent(stats, full)
            asked = time.monotonic()
            self._pause_trainers()
            # Training stops from here (each trainer held between steps) until resumed;
            # waiting for a step in progress (or an idle fetch) to end did not stop it.
            started = time.monotonic()
            try:
                position = self._drained_position()
                exported = self._export_all(parent)
                dense = self._dense.snapshot()
                dense_incarnation = self._dense.stats().incarnation
            finally:
                self._resume_trainers(rolled_back=False)
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
            self.store.retain(self.settings.keep_full)
            return manifest

    def _incremental_parent(self, stats: list[eps_pb.StatsResponse], full: bool) -> Manifest | None:
        """The checkpoint an incremental one can follow, or None (take a full one)."""
        if full or self._since_full + 1 >= self.settings.full_every:
            return None
        try:
            last = self.store.load()
        except CheckpointNotFound:
            return None
        if last.num_shards != self.num_shards:
            return None
        if any(s.incarnation != e.incarnation or s.version < e.version for s, e in zip(stats, last.shards)):
            return None  # a shard restarted or was restored since: its versions mean nothing against the last
        return last

    def _export_all(self, parent: Manifest | None) -> list[Exported]:
        def one(index: int) -> Exported:
            since = parent.shards[index].version if parent else 0
            try:
                return self._export(index, since)
            except grpc.RpcError as exc:
                if since and exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise _FallBackToFull(exc.details()) from None
                raise

        try:
            return list(self._pool.map(one, range(self.num_shards)))
        except _FallBackToFull as exc:
            _LOGGER.info("incremental export impossible (%s); taking a full checkpoint", exc)
            return list(self._pool.map(lambda i: self._export(i, 0), range(self.num_shards)))

    def _export(self, index: int, since: int) -> Exported:
        request = eps_pb.ExportRequest(since_version=since, include_optimizer_state=True)
        chunks, version, incarnation = [], since, ""
        for c in self._shards[index].Export(request, timeout=EXPORT_TIMEOUT):
            rows = RowBatch(
                decode_array(c.ids, "<i8", (c.num_rows,), "export ids"),
                decode_array(c.values, "<f4", (c.num_rows, c.width), "export values"),
                decode_array(c.update_times, "<u4", (c.num_rows,), "export update_times"),
            )
            chunks.append((c.table, rows, decode_array(c.deleted_ids, "<i8", (c.num_deleted,), "export deleted")))
            version, incarnation = c.version, c.incarnation
        if not incarnation:  # nothing exported: the version and incarnation come from Stats
            stats = self._shards[index].Stats(eps_pb.StatsRequest(), timeout=RPC_TIMEOUT)
            version, incarnation = (stats.version if since == 0 else since), stats.incarnation
        return Exported(incarnation, since, version, chunks)

    def _write(self, parent: Manifest | None, exported: list[Exported], dense: DenseSnapshot, dense_incarnation: str,
               position: ConsumerState | None, pause: float) -> Manifest:  # fmt: skip
        writer = self.store.begin("incremental" if parent else "full", self.num_shards, parent)
        for index, e in enumerate(exported):
            with writer.shard(index, e.incarnation, e.since) as out:
                for table, rows, deleted in e.chunks:
                    out.write(table, rows, deleted)
                out.version = e.version
        state = dict(dense.optimizer_state)
        writer.write_dense(dense.version, dense_incarnation, dense.tensors, state)
        stream: dict[str, Any] = {}
        if position is not None and self._consumer is not None:
            stream = {"stream": self._consumer.settings.stream, "consumer": self._consumer.settings.durable,
                      "ack_floor": position.ack_floor, "delivered": position.delivered}  # fmt: skip
        return writer.commit(stream=stream, pause_seconds=pause)

    # ---------------------------------------------------------------- restore

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
            stats = self._shard_stats()
            for i, s in enumerate(stats):
                if (s.shard, s.num_shards) != (i, self.num_shards):
                    raise FailedPrecondition(
                        f"{self.shard_addresses[i]} is shard {s.shard} of {s.num_shards}; the controller was given "
                        f"{self.num_shards} shard(s) in order, this one as shard {i}"
                    )
            last = chain[-1] if chain else None
            if last is not None and last.num_shards != self.num_shards:
                _LOGGER.info("resharding %s from %d to %d shard(s)", last.id, last.num_shards, self.num_shards)
            self._pause_trainers(best_effort=True)
            before = self._position()  # what was applied and acknowledged, some of it after the cut
            plan = restore_plan(self.store, chain, self.num_shards, route) if chain else [[] for _ in self._shards]
            responses = list(self._pool.map(lambda i: self._restore_shard(i, plan[i]), range(self.num_shards)))
            dense = self.store.dense(last) if last is not None else None
            self._dense.restore(DenseSnapshot(dense[0], dense[1], dense[2]) if dense else None)
            position = int(last.stream.get("ack_floor", 0)) if last is not None else 0
            if self._consumer is not None:
                self._consumer.rewind(position)
                metrics.RESUME_POSITION.set(position)
                if before is not None:
                    metrics.ROLLED_BACK.inc(max(0, before.ack_floor - position))
            self._expected_shards = [r.incarnation for r in responses]
            self._expected_dense = self._dense.stats().incarnation
            self._since_full = self.settings.full_every  # the next checkpoint is full
            self._resume_trainers(rolled_back=True, adopt=True)
            self.adopted = True
            seconds = time.monotonic() - started
            metrics.RESTORES.labels(reason).inc()
            metrics.LAST_RESTORE_SECONDS.set(seconds)
            _LOGGER.info(
                "restored %s (%s) onto %d shard(s) in %.2f s; trainers resume after stream sequence %d",
                last.id if last else "the empty state", reason, self.num_shards, seconds, position,
            )  # fmt: skip
            return last

    def _restore_shard(self, index: int, chunks: Sequence[Any]) -> eps_pb.RestoreResponse:
        def messages() -> Iterator[eps_pb.RowChunk]:
            for c in chunks:
                rows = c.rows
                yield eps_pb.RowChunk(
                    table=c.table, num_rows=rows.ids.shape[0], width=rows.values.shape[1],
                    includes_optimizer_state=True, ids=encode_array(rows.ids, "<i8"),
                    values=encode_array(rows.values, "<f4"), update_times=encode_array(rows.update_times, "<u4"),
                )  # fmt: skip

        return self._shards[index].Restore(messages(), timeout=EXPORT_TIMEOUT)

    # ------------------------------------------------------------------ watch

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
                self._pause_trainers(best_effort=True)
                position = self._position()
                if position is not None and position.ack_pending == 0:
                    metrics.RESUME_POSITION.set(position.ack_floor)
                    self._resume_trainers(rolled_back=False, adopt=True)
                    _LOGGER.info("a trainer restarted between steps (nothing unacknowledged): resumed it")
                    return "resumed a restarted trainer"
                reason = "trainer restarted with samples unacknowledged"
            elif not self.adopted and reason == "adopt":
                self._pause_trainers(best_effort=True)
                position = self._position()
                if position is None or position.ack_pending == 0:
                    if position is not None:
                        metrics.RESUME_POSITION.set(position.ack_floor)
                    self._adopt()
                    self._resume_trainers(rolled_back=False, adopt=True)
                    return "adopted the running cluster"
                reason = "controller started with samples unacknowledged"
            _LOGGER.warning("recovering: %s", reason)
            self.restore(reason=reason.split(" ")[0])
            return f"restored ({reason})"

    def _restart_seen(self) -> str | None:
        """Why a recovery is needed ("shard 0 ...", "dense-PS ...", "trainer", "adopt"), or None."""
        try:
            stats = self._shard_stats()
            dense = self._dense.stats()
        except (grpc.RpcError, Unavailable):
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
        for i, stub in enumerate(self._trainers):
            try:
                status = stub.Status(tr_pb.StatusRequest(), timeout=RPC_TIMEOUT)
            except grpc.RpcError:
                continue
            if status.incarnation != self._expected_trainers[i]:
                return "trainer"
        return None

    def _adopt(self) -> None:
        self._expected_shards = [s.incarnation for s in self._shard_stats()]
        self._expected_dense = self._dense.stats().incarnation
        self.adopted = True

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None,
            view: ClusterView | None = None) -> None:  # fmt: skip
        """Watches every `watch_interval` and checkpoints every `interval` until `stop`.

        Args:
            stop: set to end the loop.
            on_ready: called once the cluster is restored or adopted.
            view: where the controller runs (`LocalView` by default): a passive replica (not
                the lease holder) does nothing; checkpoints, restores and failures are recorded.
        """
        view = view or LocalView()
        next_checkpoint = 0.0  # the first as soon as the cluster is up
        ready_reported = False
        while not stop.is_set():
            if not view.is_leader():
                self.adopted = False  # a new leader adopts (or restores) the cluster as it finds it
                view.wait(stop, self.settings.watch_interval)
                continue
            try:
                trainers = view.trainers()
                if trainers is not None:
                    self.set_trainers(trainers)
                done = self.watch_once()
                if done:
                    _LOGGER.info("%s", done)
                    view.record(WARNING if done.startswith("restored") else NORMAL,
                                "Restored" if done.startswith("restored") else "Recovered", done)  # fmt: skip
                    next_checkpoint = min(next_checkpoint, time.monotonic())
                if self.adopted and not ready_reported:
                    ready_reported = True
                    if on_ready is not None:
                        on_ready()
                if self.adopted and time.monotonic() >= next_checkpoint and self._trainers_ready():
                    m = self.checkpoint()
                    view.record(NORMAL, "Checkpoint", f"checkpoint {m.id} ({m.kind}): {sum(s.rows for s in m.shards)} "
                                f"rows, stream position {m.stream.get('ack_floor', '-')}, training paused "
                                f"{m.pause_seconds:.3f} s")  # fmt: skip
                    next_checkpoint = time.monotonic() + self.settings.interval
            except (grpc.RpcError, Unavailable, CheckpointError, OSError) as exc:
                metrics.FAILURES.inc()
                _LOGGER.warning("controller round failed (retrying): %s", _describe(exc))
                view.record(WARNING, "ControllerRoundFailed", _describe(exc))
            view.wait(stop, self.settings.watch_interval)

    def set_trainers(self, addresses: Sequence[str]) -> None:
        """Replaces the trainers (Kubernetes: the trainer pods running now); known ones keep their state."""
        with self._lock:
            if list(addresses) == self.trainer_addresses:
                return
            old = dict(zip(self.trainer_addresses, zip(self._trainer_channels, self._expected_trainers)))
            channels, expected = [], []
            for address in addresses:
                channel, incarnation = old.pop(address, (None, None))
                channels.append(channel or grpc.insecure_channel(address, options=list(_CHANNEL_OPTIONS)))
                expected.append(incarnation)
            for channel, _ in old.values():
                channel.close()
            self.trainer_addresses = list(addresses)
            self._trainer_channels = channels
            self._trainers = [tr_grpc.TrainerControlStub(c) for c in channels]
            self._expected_trainers = expected

    # -------------------------------------------------------------- trainers

    def _pause_trainers(self, best_effort: bool = False) -> None:
        """Pauses every trainer between steps (all of them, or raises: except best effort,
        where an unreachable trainer is restarting and starts paused)."""
        request = tr_pb.PauseRequest(lease_seconds=self.settings.pause_lease, timeout_seconds=self.settings.pause_timeout)
        for address, stub in zip(self.trainer_addresses, self._trainers):
            try:
                response = stub.Pause(request, timeout=self.settings.pause_timeout + RPC_TIMEOUT)
            except grpc.RpcError as exc:
                if best_effort and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue
                self._resume_trainers(rolled_back=False)
                raise Unavailable(f"trainer {address} could not be paused: {_describe(exc)}") from None
            if not response.status.paused:
                self._resume_trainers(rolled_back=False)
                raise Unavailable(f"trainer {address} did not finish its step within {self.settings.pause_timeout:g} s")

    def _resume_trainers(self, rolled_back: bool, adopt: bool = False) -> None:
        for i, stub in enumerate(self._trainers):
            try:
                response = stub.Resume(tr_pb.ResumeRequest(rolled_back=rolled_back), timeout=RPC_TIMEOUT)
            except grpc.RpcError as exc:
                _LOGGER.warning("could not resume trainer %s: %s", self.trainer_addresses[i], _describe(exc))
                if adopt:
                    self._expected_trainers[i] = None
                continue
            if adopt:
                self._expected_trainers[i] = response.status.incarnation
                metrics.TRAINER_CHECKINS.inc()

    def _trainers_ready(self) -> bool:
        for stub in self._trainers:
            try:
                if not stub.Status(tr_pb.StatusRequest(), timeout=RPC_TIMEOUT).ready:
                    return False
            except grpc.RpcError:
                return False
        return True

    # ----------------------------------------------------------------- stream

    def _position(self) -> ConsumerState | None:
        return self._consumer.position() if self._consumer is not None else None

    def _drained_position(self) -> ConsumerState | None:
        """The consumer's state once nothing delivered is unacknowledged (trainers paused)."""
        if self._consumer is None:
            return None
        deadline = time.monotonic() + self.settings.drain_timeout
        while True:
            state = self._consumer.position()
            if state is None or state.ack_pending == 0:
                return state or ConsumerState(0, 0, 0, 0, 0)
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"{state.ack_pending} sample(s) delivered and not acknowledged with every trainer paused (a "
                    "trainer died mid-step?); no cut until they are"
                )
            time.sleep(0.02)

    def _shard_stats(self) -> list[eps_pb.StatsResponse]:
        out = []
        for address, stub in zip(self.shard_addresses, self._shards):
            try:
                out.append(stub.Stats(eps_pb.StatsRequest(), timeout=RPC_TIMEOUT))
            except grpc.RpcError as exc:
                raise Unavailable(f"training shard {address}: {_describe(exc)}") from None
        return out


class _FallBackToFull(Exception):
    """An incremental export is impossible (the shard forgot deletions that old)."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
