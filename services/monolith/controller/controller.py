"""The checkpoint/recovery controller: checkpoints (checkpointing), recovery, and the loop that runs them.

The loop runs where the controller is the active one (`ClusterView.is_leader`): every
`watch_interval` it checks every part and recovers what needs it (recovery.py), and every
`interval` it takes a consistent checkpoint (checkpointing.py). The trainers are paused
for both through their TrainerControl (trainers.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from monolith.checkpoint.errors import CheckpointError
from monolith.checkpoint.manifest import Manifest
from monolith.checkpoint.store import CheckpointStore
from monolith.common.errors import MonolithError, describe
from monolith.controller import metrics
from monolith.controller.checkpointing import Checkpointer
from monolith.controller.cluster import NORMAL, WARNING, ClusterView, LocalView
from monolith.controller.parameter_servers import ParameterServers
from monolith.controller.recovery import Recovery
from monolith.controller.settings import ControllerSettings
from monolith.controller.trainers import TrainerFleet
from monolith.streams.pull_consumer import ConsumerAdmin

_LOGGER = logging.getLogger("monolith.controller")

# What a round of the loop may meet and retry at the next: a part down or refusing (our
# errors and raw gRPC ones), a damaged or unwritable checkpoint.
_RETRIED = (grpc.RpcError, MonolithError, CheckpointError, OSError)


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
        self.store = store
        self.settings = settings
        lock = threading.RLock()  # one checkpoint or restore at a time
        self._servers = ParameterServers(shards, dense, consumer)
        self._trainers = TrainerFleet(trainers, settings)
        self._checkpointer = Checkpointer(store, self._servers, self._trainers, settings, lock)
        self._recovery = Recovery(store, self._servers, self._trainers, self._checkpointer, lock)
        self._lock = lock

    @property
    def num_shards(self) -> int:
        return self._servers.num_shards

    @property
    def trainer_addresses(self) -> list[str]:
        return self._trainers.addresses

    @property
    def adopted(self) -> bool:
        """Whether the cluster as it is now was restored or adopted by this controller."""
        return self._recovery.adopted

    @property
    def last_checkpoint(self) -> Manifest | None:
        return self._checkpointer.last_checkpoint

    def checkpoint(self, full: bool = False) -> Manifest:
        """Takes one consistent checkpoint (see checkpointing.py)."""
        return self._checkpointer.checkpoint(full)

    def restore(self, checkpoint_id: str | None = None, reason: str = "requested") -> Manifest | None:
        """Rolls the cluster back to a checkpoint, the newest by default (see recovery.py)."""
        return self._recovery.restore(checkpoint_id, reason)

    def watch_once(self) -> str | None:
        """Checks every part once and recovers what needs it; what was done, or None."""
        return self._recovery.watch_once()

    def set_trainers(self, addresses: Sequence[str]) -> None:
        """Replaces the trainers (Kubernetes: the trainer pods running now); known ones keep their state."""
        with self._lock:
            self._trainers.set_addresses(addresses)

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
                self._recovery.adopted = False  # a new leader adopts (or restores) the cluster as it finds it
                view.wait(stop, self.settings.watch_interval)
                continue
            try:
                trainers = view.trainers()
                if trainers is not None:
                    self.set_trainers(trainers)
                done = self.watch_once()
                if done:
                    _LOGGER.info("%s", done)
                    restored = done.startswith("restored")
                    view.record(WARNING if restored else NORMAL, "Restored" if restored else "Recovered", done)
                    next_checkpoint = min(next_checkpoint, time.monotonic())
                if self.adopted and not ready_reported:
                    ready_reported = True
                    if on_ready is not None:
                        on_ready()
                if self.adopted and time.monotonic() >= next_checkpoint and self._trainers.ready():
                    m = self.checkpoint()
                    view.record(NORMAL, "Checkpoint", f"checkpoint {m.id} ({m.kind}): {sum(s.rows for s in m.shards)} "
                                f"rows, stream position {m.stream.get('ack_floor', '-')}, training paused "
                                f"{m.pause_seconds:.3f} s")  # fmt: skip
                    next_checkpoint = time.monotonic() + self.settings.interval
            except _RETRIED as exc:
                metrics.FAILURES.inc()
                _LOGGER.warning("controller round failed (retrying): %s", describe(exc))
                view.record(WARNING, "ControllerRoundFailed", describe(exc))
            view.wait(stop, self.settings.watch_interval)

    def close(self) -> None:
        self._checkpointer.close()
        self._recovery.close()
        self._trainers.close()
        self._servers.close()
