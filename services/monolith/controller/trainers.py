"""The online trainers as the controller drives them: pause between steps, resume, notice restarts.

Each trainer serves `TrainerControl` (trainer/control.py) on its --control-port. A pause is
a lease: a trainer resumes by itself if the controller vanishes. The controller checks a
trainer in (records its incarnation) when it resumes it after a restore or an adoption, so
a later incarnation it reports means the trainer restarted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from monolith.api.trainer.v1 import trainer_pb2 as pb
from monolith.api.trainer.v1 import trainer_pb2_grpc as pb_grpc
from monolith.common.channel import open_channel
from monolith.common.errors import Unavailable, describe
from monolith.controller import metrics
from monolith.controller.settings import CHANNEL, RPC_TIMEOUT, ControllerSettings

_LOGGER = logging.getLogger("monolith.controller")


class _Trainer:
    """One trainer's channel and the incarnation it was checked in with (None: not yet)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = open_channel(address, CHANNEL)
        self.stub = pb_grpc.TrainerControlStub(self.channel)
        self.incarnation: str | None = None


class TrainerFleet:
    """Every online trainer the controller pauses for a cut or a rollback.

    Args:
        addresses: "host:port" of each trainer's TrainerControl.
        settings: the pause lease and how long a step may take to end.
    """

    def __init__(self, addresses: Sequence[str], settings: ControllerSettings) -> None:
        self._settings = settings
        self._trainers = [_Trainer(a) for a in addresses]

    @property
    def addresses(self) -> list[str]:
        return [t.address for t in self._trainers]

    def __len__(self) -> int:
        return len(self._trainers)

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Replaces the trainers (Kubernetes: the trainer pods running now); known ones keep their state."""
        if list(addresses) == self.addresses:
            return
        known = {t.address: t for t in self._trainers}
        self._trainers = [known.pop(a, None) or _Trainer(a) for a in addresses]
        for gone in known.values():
            gone.channel.close()

    def pause(self, best_effort: bool = False) -> None:
        """Pauses every trainer between two steps, or resumes them all and raises.

        Args:
            best_effort: skip a trainer that does not answer (it is restarting, and a
                restarted trainer starts paused).

        Raises:
            Unavailable: a trainer could not be paused, or did not end its step in time.
        """
        request = pb.PauseRequest(lease_seconds=self._settings.pause_lease,
                                  timeout_seconds=self._settings.pause_timeout)  # fmt: skip
        for trainer in self._trainers:
            try:
                response = trainer.stub.Pause(request, timeout=self._settings.pause_timeout + RPC_TIMEOUT)
            except grpc.RpcError as exc:
                if best_effort and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue
                self.resume(rolled_back=False)
                raise Unavailable(f"trainer {trainer.address} could not be paused: {describe(exc)}") from None
            if not response.status.paused:
                self.resume(rolled_back=False)
                raise Unavailable(
                    f"trainer {trainer.address} did not finish its step within {self._settings.pause_timeout:g} s"
                )

    def resume(self, rolled_back: bool, check_in: bool = False) -> None:
        """Resumes every trainer (one that does not answer is logged and skipped).

        Args:
            rolled_back: the parameter servers were rolled back: trainers drop what they
                hold (delivered samples, dense parameters) and read on from the cut.
            check_in: record each trainer's incarnation (after a restore or an adoption),
                so a later restart is noticed.
        """
        for trainer in self._trainers:
            try:
                response = trainer.stub.Resume(pb.ResumeRequest(rolled_back=rolled_back), timeout=RPC_TIMEOUT)
            except grpc.RpcError as exc:
                _LOGGER.warning("could not resume trainer %s: %s", trainer.address, describe(exc))
                if check_in:
                    trainer.incarnation = None
                continue
            if check_in:
                trainer.incarnation = response.status.incarnation
                metrics.TRAINER_CHECKINS.inc()

    def ready(self) -> bool:
        """Whether every trainer answers and says it is ready to train."""
        for trainer in self._trainers:
            try:
                if not trainer.stub.Status(pb.StatusRequest(), timeout=RPC_TIMEOUT).ready:
                    return False
            except grpc.RpcError:
                return False
        return True

    def restarted(self) -> bool:
        """Whether a trainer reports an incarnation other than the one it was checked in with.

        A trainer that does not answer is restarting: it is noticed once it answers.
        """
        for trainer in self._trainers:
            try:
                status = trainer.stub.Status(pb.StatusRequest(), timeout=RPC_TIMEOUT)
            except grpc.RpcError:
                continue
            if status.incarnation != trainer.incarnation:
                return True
        return False

    def close(self) -> None:
        for trainer in self._trainers:
            trainer.channel.close()
