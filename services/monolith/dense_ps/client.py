"""A client of the dense-PS, for trainers and model-serving."""

from __future__ import annotations

from concurrent import futures
from typing import Iterable, Mapping, Sequence

import grpc
import numpy as np

from monolith.api.dense_ps.v1 import dense_ps_pb2 as pb
from monolith.api.dense_ps.v1 import dense_ps_pb2_grpc as pb_grpc
from monolith.common.wire import decode_array, encode_array
from monolith.dense_ps.optimizers import STEP_KEY
from monolith.dense_ps.store import DenseSnapshot


class DensePSClient:
    """Talks to one dense-PS.

    Arrays it returns are read-only views of the response bytes; copy one to change it.

    Args:
        address: "host:port" of the dense-PS.
        timeout: seconds per RPC.
        max_message_bytes: max gRPC message size on the channel.
        channel_options: more gRPC channel arguments (e.g. a shorter reconnect backoff).
    """

    def __init__(self, address: str, timeout: float = 30.0, max_message_bytes: int = 64 * 1024 * 1024,
                 channel_options: Sequence[tuple[str, object]] = ()) -> None:  # fmt: skip
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *channel_options,
        ]
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.DensePSStub(self._channel)
        self._timeout = timeout

    def init(self, tensors: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Offers initial parameters; returns (version, the parameters the PS holds).

        The PS adopts them if it holds none; otherwise (same names and shapes) it answers
        with its own, which the caller should start from.
        """
        response = self._stub.Init(pb.InitRequest(tensors=_encode(tensors)), timeout=self._timeout)
        return response.version, _decode(response.tensors)

    def pull(self, if_newer_than: int = 0, names: Sequence[str] = ()) -> tuple[int, dict[str, np.ndarray] | None]:
        """The parameters (all, or `names`) and their version.

        Returns:
            (version, tensors by name), or (version, None) if version <= if_newer_than.
        """
        request = pb.PullRequest(names=names, if_newer_than=if_newer_than)
        response = self._stub.Pull(request, timeout=self._timeout)
        return response.version, None if response.unchanged else _decode(response.tensors)

    def pull_incarnation(
        self, if_newer_than: int = 0, if_incarnation: str = ""
    ) -> tuple[str, int, dict[str, np.ndarray] | None]:
        """`pull`, with the dense-PS's incarnation; tensors whenever it is not `if_incarnation`.

        Returns:
            (incarnation, version, tensors by name or None when the caller is current).
        """
        request = pb.PullRequest(if_newer_than=if_newer_than, if_incarnation=if_incarnation)
        response = self._stub.Pull(request, timeout=self._timeout)
        return response.incarnation, response.version, None if response.unchanged else _decode(response.tensors)

    def snapshot(self) -> DenseSnapshot:
        """The parameters, their optimizer state ("step" included) and version, copied at one instant."""
        response = self._stub.Snapshot(pb.SnapshotRequest(), timeout=self._timeout)
        state = _decode(response.optimizer_state)
        state[STEP_KEY] = np.array(response.optimizer_step, np.int64)
        return DenseSnapshot(response.version, _decode(response.tensors), state)

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
            request = pb.RestoreRequest(version=snapshot.version, tensors=_encode(snapshot.tensors),
                                        optimizer_state=_encode(state), optimizer_step=step)  # fmt: skip
        return self._stub.Restore(request, timeout=self._timeout).incarnation

    def push(self, grads: Mapping[str, np.ndarray]) -> int:
        """Applies gradients of some or all tensors; returns the version after the push."""
        response = self._stub.Push(pb.PushRequest(gradients=_encode(grads)), timeout=self._timeout)
        return response.version

    def push_async(self, grads: Mapping[str, np.ndarray]) -> futures.Future[int]:
        """Sends gradients without waiting; the future's result is the version after the push.

        Its `result()` raises the `grpc.RpcError` of a rejected push.
        """
        call = self._stub.Push.future(pb.PushRequest(gradients=_encode(grads)), timeout=self._timeout)
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


def _encode(tensors: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    return [
        pb.Tensor(name=name, shape=np.shape(t), values=encode_array(t, "<f4")) for name, t in tensors.items()
    ]


def _decode(messages: Iterable[pb.Tensor]) -> dict[str, np.ndarray]:
    return {t.name: decode_array(t.values, "<f4", tuple(t.shape), f"tensor {t.name!r}") for t in messages}
