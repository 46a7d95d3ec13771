"""The client: official TF Serving stubs, feature dicts in, scores out; no monolith protos needed."""

from __future__ import annotations

import uuid
from typing import Any, Mapping, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc


class PredictError(RuntimeError):
    """A Predict call failed; `code` is the gRPC status, the message TF Serving's details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class MonolithClient:
    """Scores candidates for a user through the Predict API.

    Args:
        address: "host:port" of model-serving.
        model_name: the served model's name.
        signature_name: its signature.
        timeout: seconds per call.
    """

    def __init__(self, address: str, model_name: str = "monolith", signature_name: str = "serving_default",
                 timeout: float = 5.0) -> None:  # fmt: skip
        self._channel = grpc.insecure_channel(address)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self.model_name = model_name
        self.signature_name = signature_name
        self.timeout = timeout

    def score(
        self, user: Mapping[str, Any], candidates: Mapping[str, Sequence[Any]], request_id: str | None = None
    ) -> np.ndarray:
        """Probabilities that the user acts on each candidate.

        The user's features are sent once (outer size 1, broadcast by the server) and each
        candidate feature as a list with one entry per candidate; a multi-valued feature
        (e.g. genres) is a list per candidate.

        Args:
            user: one value per user feature.
            candidates: a list per candidate feature, all of the same length N.
            request_id: the id to report actions under; a fresh one if None.

        Returns:
            float32 [N] scores.
        """
        sizes = {name: len(values) for name, values in candidates.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"candidate features differ in length: {sizes}")
        features: dict[str, Any] = {name: [value] for name, value in user.items()}
        features.update(candidates)
        return self.predict(features, request_id)

    def predict(self, features: Mapping[str, Any], request_id: str | None = None) -> np.ndarray:
        """Scores for a batch of examples given feature by feature.

        Args:
            features: per feature, a list (or array) with one value per example, or one
                list of values per example for a multi-valued feature; a list of length 1
                is broadcast across the batch.
            request_id: the id to report actions under; a fresh one if None.

        Returns:
            float32 [batch] scores.
        """
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = self.signature_name
        for name, values in features.items():
            request.inputs[name].CopyFrom(_tensor(values))
        request.inputs["request_id"].CopyFrom(tf.make_tensor_proto([request_id or uuid.uuid4().hex]))
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

    def close(self) -> None:
        self._channel.close()

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


def _is_ragged(values: Any) -> bool:
    return (
        isinstance(values, (list, tuple))
        and any(isinstance(row, (list, tuple, np.ndarray)) for row in values)
    )
