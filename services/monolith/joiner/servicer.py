"""The `SampleJoiner` gRPC API: a thin layer over `JoinerRuntime.report`."""

from __future__ import annotations

import grpc

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.api.joiner.v1 import joiner_pb2_grpc as pb_grpc
from monolith.joiner.runtime import JoinerRuntime

SERVICE_NAME = "monolith.api.joiner.v1.SampleJoiner"


class SampleJoinerServicer(pb_grpc.SampleJoinerServicer):
    def __init__(self, runtime: JoinerRuntime) -> None:
        self._runtime = runtime

    def ReportActions(self, request: pb.ReportActionsRequest, context: grpc.ServicerContext) -> pb.ReportActionsResponse:
        return pb.ReportActionsResponse(accepted=self._runtime.report(request.actions))
