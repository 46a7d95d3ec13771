"""The DensePS gRPC servicer: a thin adapter between protos and `DenseStore`.

Each RPC decodes its tensors (shape- and length-checked), calls the store, and encodes
the answer. Errors are exceptions that know their status, mapped by the server's
interceptor.
"""

from __future__ import annotations

import grpc
import numpy as np

from monolith.api.dense_ps.v1 import dense_ps_pb2 as pb
from monolith.api.dense_ps.v1 import dense_ps_pb2_grpc as pb_grpc
from monolith.common.errors import InvalidArgument
from monolith.dense_ps.optimizers import STEP_KEY
from monolith.dense_ps.store import DenseStore
from monolith.dense_ps.tensors import decode_tensors, encode_tensors

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DensePS"].full_name


class DensePSServicer(pb_grpc.DensePSServicer):
    """Serves one store."""

    def __init__(self, store: DenseStore) -> None:
        self._store = store

    def Init(self, request: pb.InitRequest, context: grpc.ServicerContext) -> pb.InitResponse:
        version, tensors = self._store.init(decode_tensors(request.tensors, "init tensor"))
        return pb.InitResponse(version=version, tensors=encode_tensors(tensors))

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> pb.PullResponse:
        incarnation, version, tensors = self._store.pull_incarnation(
            list(request.names), request.if_newer_than, request.if_incarnation
        )
        if tensors is None:
            return pb.PullResponse(version=version, unchanged=True, incarnation=incarnation)
        return pb.PullResponse(version=version, tensors=encode_tensors(tensors), incarnation=incarnation)

    def Push(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PushResponse:
        try:
            grads = decode_tensors(request.gradients, "gradient")
        except InvalidArgument:
            # A malformed push never reaches the store; count it there all the same, so the
            # rejected-pushes metric sees every rejection.
            self._store.count_rejected_push()
            raise
        if request.return_parameters:
            version, params = self._store.push_pull(grads)
            return pb.PushResponse(version=version, tensors=encode_tensors(params))
        return pb.PushResponse(version=self._store.push(grads))

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        s = self._store.stats()
        return pb.StatsResponse(
            version=s.version,
            num_tensors=s.num_tensors,
            parameters=s.parameters,
            bytes=s.bytes,
            pushes=s.pushes,
            rejected_pushes=s.rejected_pushes,
            optimizer=s.optimizer,
            incarnation=s.incarnation,
            awaiting_restore=s.awaiting_restore,
        )

    def Snapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotResponse:
        snap = self._store.snapshot()
        state = dict(snap.optimizer_state)
        step = int(state.pop(STEP_KEY))
        return pb.SnapshotResponse(
            version=snap.version,
            tensors=encode_tensors(snap.tensors),
            optimizer_state=encode_tensors(state),
            optimizer_step=step,
            incarnation=self._store.incarnation,
        )

    def Restore(self, request: pb.RestoreRequest, context: grpc.ServicerContext) -> pb.RestoreResponse:
        tensors = decode_tensors(request.tensors, "restore tensor")
        if not tensors:
            return pb.RestoreResponse(version=0, incarnation=self._store.end_restore_wait())
        state: dict[str, np.ndarray] = dict(decode_tensors(request.optimizer_state, "restore optimizer state"))
        state[STEP_KEY] = np.array(request.optimizer_step, np.int64)
        self._store.restore(request.version, tensors, state)
        return pb.RestoreResponse(version=self._store.version, incarnation=self._store.incarnation)

