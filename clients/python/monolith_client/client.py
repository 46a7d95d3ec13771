"""The client: official TF Serving stubs, feature dicts in, scores out; actions to the sample-joiner.

Predict needs no monolith protos. Reporting actions calls the joiner's `SampleJoiner` API,
whose stubs come with the monolith package: they are imported on the first report.
Channels come from monolith's channel factory (`monolith.common.channel`, installed with
this client), like every monolith client's: message limits and keepalive the servers
accept, and TLS when model-serving serves it (`monolith serving --tls-cert/--tls-key`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence, Union

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from monolith.common.channel import ChannelConfig, TlsConfig, open_channel


class MonolithClientError(RuntimeError):
    """A call failed; `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class PredictError(MonolithClientError):
    """A Predict call failed (the message is TF Serving's details)."""


class ActionError(MonolithClientError):
    """A ReportActions call failed; none of its actions is stored (the joiner takes all or none)."""


# An action as `report_actions` takes it: a dict of `report_action`'s arguments, or a tuple
# of them in order (request_id, item_id[, kind[, label[, event_time]]]).
ActionLike = Union[Mapping[str, Any], Sequence[Any]]


class MonolithClient:
    """Scores candidates for a user through the Predict API, and reports what the user did.

    Args:
        address: "host:port" of model-serving.
        model_name: the served model's name.
        signature_name: its signature.
        timeout: seconds per call.
        joiner_address: "host:port" of the sample-joiner, for `report_action(s)`; None if
            this client only scores. The joiner is dialed in plaintext (it serves no TLS).
        tls: call model-serving over TLS, trusting the system's root certificates (or
            `tls_ca`); implied by `tls_ca` and `tls_server_name`.
        tls_ca: PEM file of the certificate(s) to trust for model-serving's certificate;
            for a self-signed certificate, the certificate itself.
        tls_server_name: the name model-serving's certificate must carry, when it is not
            the host in `address` (e.g. "localhost" when dialing 127.0.0.1).

    Raises:
        ConfigError: `tls_ca` cannot be read.
    """

    def __init__(self, address: str, model_name: str = "monolith", signature_name: str = "serving_default",
                 timeout: float = 5.0, joiner_address: str | None = None, *, tls: bool = False,
                 tls_ca: str | os.PathLike[str] | None = None, tls_server_name: str | None = None) -> None:  # fmt: skip
        secure = tls or tls_ca is not None or tls_server_name is not None
        ca = None if tls_ca is None else os.fspath(tls_ca)
        config = ChannelConfig(tls=TlsConfig(ca=ca, server_name=tls_server_name) if secure else None)
        self._channel = open_channel(address, config)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self.model_name = model_name
        self.signature_name = signature_name
        self.timeout = timeout
        self.joiner_address = joiner_address
        self._joiner_channel: grpc.Channel | None = None
        self._joiner: Any = None  # the SampleJoiner stub, made on the first report

    def score(
        self,
        user: Mapping[str, Any],
        candidates: Mapping[str, Sequence[Any]],
        request_id: str | None = None,
        event_time: float | None = None,
    ) -> np.ndarray:
        """Probabilities that the user acts on each candidate.

        The user's features are sent once (outer size 1, broadcast by the server) and each
        candidate feature as a list with one entry per candidate; a multi-valued feature
        (e.g. genres) is a list per candidate.

        Args:
            user: one value per user feature.
            candidates: a list per candidate feature, all of the same length N.
            request_id: the id to report actions under. With one, model-serving logs the
                candidates as impressions (shown to the user), and each becomes a training
                sample: positive if an action is reported for it, else negative. None:
                nothing is logged (e.g. a call no user sees).
            event_time: when the candidates are shown, seconds since the epoch; None: the
                server's clock.

        Returns:
            float32 [N] scores.
        """
        sizes = {name: len(values) for name, values in candidates.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"candidate features differ in length: {sizes}")
        features: dict[str, Any] = {name: [value] for name, value in user.items()}
        features.update(candidates)
        return self.predict(features, request_id, event_time)

    def predict(
        self,
        features: Mapping[str, Any],
        request_id: str | None = None,
        event_time: float | Sequence[float] | None = None,
    ) -> np.ndarray:
        """Scores for a batch of examples given feature by feature.

        Args:
            features: per feature, a list (or array) with one value per example, or one
                list of values per example for a multi-valued feature; a list of length 1
                is broadcast across the batch.
            request_id: the id to report actions under (see `score`); None: no impressions.
            event_time: seconds since the epoch, one for the call or one per example; None:
                the server's clock.

        Returns:
            float32 [batch] scores.
        """
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = self.signature_name
        for name, values in features.items():
            request.inputs[name].CopyFrom(_tensor(values))
        if request_id is not None:
            request.inputs["request_id"].CopyFrom(tf.make_tensor_proto([str(request_id)], dtype=tf.string))
        if event_time is not None:
            # float64: a float32 second since the epoch is only good to about two minutes.
            times = np.asarray(event_time, dtype=np.float64).reshape(-1)
            request.inputs["event_time"].CopyFrom(tf.make_tensor_proto(times, dtype=tf.float64))
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise PredictError(exc.code(), exc.details()) from None
        return tf.make_ndarray(response.outputs["scores"])

    def input_names(self) -> list[str]:
        """The signature's input names, from GetModelMetadata."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self.model_name
        response = self._stub.GetModelMetadata(request, timeout=self.timeout)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return sorted(signatures.signature_def[self.signature_name].inputs)

    def report_action(
        self,
        request_id: str,
        item_id: Any,
        kind: str = "click",
        label: float = 1.0,
        event_time: float | None = None,
    ) -> None:
        """Reports what the user did with a candidate of a `score(..., request_id=...)` call.

        Args:
            request_id: the request_id the candidate was scored under.
            item_id: the candidate: its item feature's value (e.g. the movie_id; an int is
                sent as its decimal text, as the model hashes it).
            kind: the action kind (one the joiner accepts, "click" by default).
            label: 1 for a positive action; 0 records one that is not.
            event_time: when it happened, seconds since the epoch; None: now.

        Raises:
            ValueError: the client has no joiner_address.
            ActionError: the joiner refused it (e.g. INVALID_ARGUMENT) or could not store it.
        """
        self.report_actions([(request_id, item_id, kind, label, event_time)])

    def report_actions(self, actions: Sequence[ActionLike]) -> int:
        """Reports several actions in one call; the joiner stores all of them or none.

        Args:
            actions: each a dict of `report_action`'s arguments (request_id and item_id
                required) or a tuple of them in order.

        Returns:
            The number of actions stored.

        Raises:
            ValueError: the client has no joiner_address, or an action lacks request_id or item_id.
            ActionError: the joiner refused them (nothing is stored) or could not store them.
        """
        stub, joiner_pb2 = self._joiner_stub()
        now = time.time()
        request = joiner_pb2.ReportActionsRequest()
        for action in actions:
            fields = _action_fields(action)
            event_time = fields.get("event_time")
            request.actions.add(
                request_id=str(fields["request_id"]),
                item_id=str(fields["item_id"]),
                kind=str(fields.get("kind", "click")),
                label=float(fields.get("label", 1.0)),
                event_time=now if event_time is None else float(event_time),
            )
        try:
            response = stub.ReportActions(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise ActionError(exc.code(), exc.details()) from None
        return int(response.accepted)

    def _joiner_stub(self) -> tuple[Any, Any]:
        if self.joiner_address is None:
            raise ValueError(
                "reporting actions needs the sample-joiner's address: "
                "MonolithClient(address, joiner_address='host:port')"
            )
        try:
            from monolith.api.joiner.v1 import joiner_pb2, joiner_pb2_grpc
        except ImportError as exc:
            raise ImportError(f"reporting actions needs the monolith package (its joiner API stubs): {exc}") from exc
        if self._joiner is None:
            self._joiner_channel = open_channel(self.joiner_address)
            self._joiner = joiner_pb2_grpc.SampleJoinerStub(self._joiner_channel)
        return self._joiner, joiner_pb2

    def close(self) -> None:
        self._channel.close()
        if self._joiner_channel is not None:
            self._joiner_channel.close()

    def __enter__(self) -> MonolithClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _tensor(values: Any) -> Any:
    """A TensorProto: int64 ids as int64, anything else as strings; ragged rows padded with ""."""
    array = np.asarray(values, dtype=object) if _is_ragged(values) else np.asarray(values)
    if array.ndim == 0:
        array = array.reshape(1)
    if _is_ragged(values):
        width = max(len(row) for row in values)
        padded = [[str(v) for v in row] + [""] * (width - len(row)) for row in values]
        return tf.make_tensor_proto(padded, dtype=tf.string)
    if array.dtype.kind in "iu":
        return tf.make_tensor_proto(array.astype(np.int64), dtype=tf.int64)
    return tf.make_tensor_proto(np.vectorize(str, otypes=[object])(array).astype(bytes), dtype=tf.string)


_ACTION_FIELDS = ("request_id", "item_id", "kind", "label", "event_time")


def _action_fields(action: ActionLike) -> dict[str, Any]:
    """An action's fields by name, from a dict or a tuple in `report_action`'s order."""
    if isinstance(action, Mapping):
        unknown = set(action) - set(_ACTION_FIELDS)
        if unknown:
            raise ValueError(f"unknown action field(s) {sorted(unknown)}; known: {', '.join(_ACTION_FIELDS)}")
        fields = dict(action)
    else:
        if not 2 <= len(action) <= len(_ACTION_FIELDS):
            raise ValueError(f"an action tuple is (request_id, item_id[, kind[, label[, event_time]]]), got {action!r}")
        fields = dict(zip(_ACTION_FIELDS, action))
    for name in ("request_id", "item_id"):
        if fields.get(name) is None or fields[name] == "":
            raise ValueError(f"an action needs a non-empty {name}, got {action!r}")
    return {name: value for name, value in fields.items() if value is not None}


def _is_ragged(values: Any) -> bool:
    return (
        isinstance(values, (list, tuple))
        and any(isinstance(row, (list, tuple, np.ndarray)) for row in values)
    )
