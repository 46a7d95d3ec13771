"""A client of the dense-PS, for trainers, model-serving and the checkpoint controller."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent import futures

import grpc
import numpy as np

from monolith.api.dense_ps.v1 import dense_ps_pb2 as pb
from monolith.api.dense_ps.v1 import dense_ps_pb2_grpc as pb_grpc
from monolith.common.channel import DEFAULT, ChannelConfig, open_channel
from monolith.dense_ps.optimizers import STEP_KEY
from monolith.dense_ps.store import DenseSnapshot
from monolith.dense_ps.tensors import decode_tensors, encode_tensors

_ANSWER = "dense-PS answer's tensor"  # names a tensor of a response in errors


class DensePSClient:
    """Talks to one dense-PS.

    Arrays it returns are read-only views of the response bytes; copy one to change it.
    Failed calls raise the `grpc.RpcError` of the call; an answer whose tensors do not fit
    their shapes, or name one tensor twice, raises InvalidArgument.

    Args:
        address: "host:port" of the dense-PS.
        timeout: seconds per RPC.
        channel: how to dial the dense-PS (message limits, reconnect backoff, TLS).

    Raises:
        ConfigError: a TLS file of `channel` cannot be read.
    """

    def __init__(self, address: str, timeout: float = 30.0, channel: ChannelConfig = DEFAULT) -> None:
        self._channel = open_channel(address, channel)
        self._stub = pb_grpc.DensePSStub(self._channel)
        self._timeout = timeout

    def init(self, tensors: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Offers initial parameters; returns (version, the parameters the PS holds).

        The PS adopts them if it holds none; otherwise (same names and shapes) it answers
        with its own, which the caller should start from.
        """
        response = self._stub.Init(pb.InitRequest(tensors=encode_tensors(tensors)), timeout=self._timeout)
        return response.version, decode_tensors(response.tensors, _ANSWER)

    def pull(self, if_newer_than: int = 0, names: Sequence[str] = ()) -> tuple[int, dict[str, np.ndarray] | None]:
        """The parameters (all, or `names`) and their version.

        Returns:
            (version, tensors by name), or (version, None) if version <= if_newer_than.
        """
        request = pb.PullRequest(names=names, if_newer_than=if_newer_than)
        response = self._stub.Pull(request, timeout=self._timeout)
        return response.version, None if response.unchanged else decode_tensors(response.tensors, _ANSWER)

    def pull_incarnation(
        self, if_newer_than: int = 0, if_incarnation: str = ""
    ) -> tuple[str, int, dict[str, np.ndarray] | None]:
        """`pull`, with the dense-PS's incarnation; tensors whenever it is not `if_incarnation`.

        Returns:
            (incarnation, version, tensors by name or None when the caller is current).
        """
        request = pb.PullRequest(if_newer_than=if_newer_than, if_incarnation=if_incarnation)
        response = self._stub.Pull(request, timeout=self._timeout)
        tensors = None if response.unchanged else decode_tensors(response.tensors, _ANSWER)
        return response.incarnation, response.version, tensors

    def snapshot(self) -> DenseSnapshot:
        """The parameters, their optimizer state ("step" included) and version, copied at one instant."""
        response = self._stub.Snapshot(pb.SnapshotRequest(), timeout=self._timeout)
        state = decode_tensors(response.optimizer_state, "dense-PS answer's optimizer state")
        state[STEP_KEY] = np.array(response.optimizer_step, np.int64)
        return DenseSnapshot(response.version, decode_tensors(response.tensors, _ANSWER), state)

    def restore(self, snapshot: DenseSnapshot | None) -> str:
        """Replaces the dense-PS's state with a snapshot; None ends its restore wait empty.

        Returns:
            The dense-PS's new incarnation.
        """
        if snapshot is None:
            request = pb.RestoreRequest()
        else:
            state = dict(snapshot.optimizer_state)
            step = int(state.pop(STEP_KEY))
            request = pb.RestoreRequest(version=snapshot.version, tensors=encode_tensors(snapshot.tensors),
                                        optimizer_state=encode_tensors(state), optimizer_step=step)  # fmt: skip
        return self._stub.Restore(request, timeout=self._timeout).incarnation

    def push(self, grads: Mapping[str, np.ndarray]) -> int:
        """Applies gradients of some or all tensors; returns the version after the push."""
        response = self._stub.Push(pb.PushRequest(gradients=encode_tensors(grads)), timeout=self._timeout)
        return response.version

    def push_pull(self, grads: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Applies gradients and answers with every parameter as that push left them (one call, not two).

        Returns:
            (the version after the push, the parameters by name).
        """
        request = pb.PushRequest(gradients=encode_tensors(grads), return_parameters=True)
        response = self._stub.Push(request, timeout=self._timeout)
        return response.version, decode_tensors(response.tensors, _ANSWER)

    def push_async(self, grads: Mapping[str, np.ndarray]) -> futures.Future[int]:
        """Sends gradients without waiting; the future's result is the version after the push.

        Its `result()` raises the `grpc.RpcError` of a rejected push.
        """
        call = self._stub.Push.future(pb.PushRequest(gradients=encode_tensors(grads)), timeout=self._timeout)
        out: futures.Future[int] = futures.Future()

        def done(c: grpc.Future) -> None:
            try:
                out.set_result(c.result().version)
            except Exception as exc:  # noqa: BLE001 - handed to the waiter, who sees it
                out.set_exception(exc)

        call.add_done_callback(done)
        return out

    def stats(self) -> pb.StatsResponse:
        """Sizes and counters."""
        return self._stub.Stats(pb.StatsRequest(), timeout=self._timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DensePSClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

