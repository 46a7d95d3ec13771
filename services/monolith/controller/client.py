"""A client of the checkpoint controller: take a checkpoint, list them, roll back to one."""

from __future__ import annotations

import grpc

from monolith.api.controller.v1 import controller_pb2 as pb
from monolith.api.controller.v1 import controller_pb2_grpc as pb_grpc
from monolith.common.channel import DEFAULT, ChannelConfig, open_channel
from monolith.common.errors import from_rpc_error


class ControllerClient:
    """Talks to one controller.

    Args:
        address: "host:port" of the controller's gRPC service.
        timeout: seconds a call may take (a checkpoint pauses the trainers and exports every
            shard; a restore streams every row back).
        channel: how to dial it.

    Raises (every call):
        MonolithError: the controller's status, naming it (UNAVAILABLE when it is down, or
            when a part it drives is).
    """

    def __init__(self, address: str, timeout: float = 600.0, channel: ChannelConfig = DEFAULT) -> None:
        self.address = address
        self._timeout = timeout
        self._channel = open_channel(address, channel)
        self._stub = pb_grpc.ControllerStub(self._channel)

    def checkpoint(self, full: bool = False) -> pb.CheckpointInfo:
        """Takes a consistent checkpoint now (incremental unless `full`)."""
        return self._call("Checkpoint", pb.CheckpointRequest(full=full)).checkpoint

    def checkpoints(self) -> list[pb.CheckpointInfo]:
        """The checkpoints in storage, oldest first."""
        return list(self._call("ListCheckpoints", pb.ListCheckpointsRequest()).checkpoints)

    def restore(self, checkpoint_id: str = "") -> pb.RestoreResponse:
        """Rolls the cluster back to a checkpoint (the newest when `checkpoint_id` is empty)."""
        return self._call("Restore", pb.RestoreRequest(id=checkpoint_id))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"controller at {self.address} {method}") from None
