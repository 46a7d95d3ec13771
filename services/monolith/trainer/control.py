"""The TrainerControl gRPC servicer: a thin adapter between protos and the trainer's StepGate."""

from __future__ import annotations

import uuid

import grpc

from monolith.api.trainer.v1 import trainer_pb2 as pb
from monolith.api.trainer.v1 import trainer_pb2_grpc as pb_grpc
from monolith.common.errors import InvalidArgument
from monolith.common.server import MonolithServer, ServerConfig, Service, build_server
from monolith.trainer.online import OnlineTrainer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainerControl"].full_name
DEFAULT_PAUSE_TIMEOUT = 30.0


class TrainerControlServicer(pb_grpc.TrainerControlServicer):
    """Pauses and resumes one online trainer.

    Attributes:
        incarnation: a random id drawn at start; a controller that sees a new one knows
            the trainer restarted (and what it applied since the last cut is unknown).
    """

    def __init__(self, trainer: OnlineTrainer) -> None:
        self._trainer = trainer
        self.incarnation = uuid.uuid4().hex

    def Pause(self, request: pb.PauseRequest, context: grpc.ServicerContext) -> pb.PauseResponse:
        if not request.lease_seconds > 0:
            raise InvalidArgument(f"lease_seconds must be > 0, got {request.lease_seconds}")
        if request.timeout_seconds < 0:
            raise InvalidArgument(f"timeout_seconds must be >= 0, got {request.timeout_seconds}")
        self._trainer.gate.pause(request.lease_seconds, request.timeout_seconds or DEFAULT_PAUSE_TIMEOUT)
        return pb.PauseResponse(status=self._status())

    def Resume(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.ResumeResponse:
        self._trainer.gate.resume(rolled_back=request.rolled_back)
        return pb.ResumeResponse(status=self._status())

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        return self._status()

    def _status(self) -> pb.StatusResponse:
        summary = self._trainer.summary
        return pb.StatusResponse(
            incarnation=self.incarnation,
            paused=self._trainer.gate.state().paused,
            steps=summary.steps,
            examples=summary.examples,
            last_sequence=summary.last_sequence,
            ready=self._trainer.ready,
        )


def build_control_server(trainer: OnlineTrainer, config: ServerConfig) -> tuple[MonolithServer, TrainerControlServicer]:
    """An unstarted TrainerControl server for the trainer."""
    servicer = TrainerControlServicer(trainer)
    server = build_server(
        config, [Service(SERVICE_NAME, lambda s: pb_grpc.add_TrainerControlServicer_to_server(servicer, s))]
    )
    return server, servicer
