"""The Controller gRPC servicer: a thin adapter between protos and `CheckpointController`."""

from __future__ import annotations

import time

import grpc

from monolith.api.controller.v1 import controller_pb2 as pb
from monolith.api.controller.v1 import controller_pb2_grpc as pb_grpc
from monolith.checkpoint.manifest import Manifest
from monolith.controller.controller import CheckpointController

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Controller"].full_name


class ControllerServicer(pb_grpc.ControllerServicer):
    """Serves one controller."""

    def __init__(self, controller: CheckpointController) -> None:
        self._controller = controller

    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        return pb.CheckpointResponse(checkpoint=checkpoint_info(self._controller.checkpoint(full=request.full)))

    def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: grpc.ServicerContext
    ) -> pb.ListCheckpointsResponse:
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_info(m) for m in self._controller.store.list()])

    def Restore(self, request: pb.RestoreRequest, context: grpc.ServicerContext) -> pb.RestoreResponse:
        started = time.monotonic()
        manifest = self._controller.restore(request.id or None)
        info = checkpoint_info(manifest) if manifest is not None else pb.CheckpointInfo()
        return pb.RestoreResponse(checkpoint=info, seconds=time.monotonic() - started)


def checkpoint_info(m: Manifest) -> pb.CheckpointInfo:
    """A manifest's summary."""
    return pb.CheckpointInfo(
        id=m.id,
        kind=m.kind,
        base=m.base,
        rows=sum(s.rows for s in m.shards),
        bytes=sum(f.bytes for f in m.files),
        pause_seconds=m.pause_seconds,
        stream_position=int(m.stream.get("ack_floor", 0)),
        created_at=m.created_at,
    )
