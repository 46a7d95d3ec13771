"""TensorFlow Serving's PredictionService over `ServingModel`: Predict and GetModelMetadata.

Built on the official `tensorflow-serving-api` stubs, so any TF Serving client works
unchanged. Errors follow TF Serving's codes: a bad request is INVALID_ARGUMENT, an
unknown model or version NOT_FOUND, an unknown signature FAILED_PRECONDITION; overload
(the server's cap on calls in flight) is RESOURCE_EXHAUSTED; a request whose deadline
passes while it is worked on is abandoned between stages with DEADLINE_EXCEEDED. With a
`PredictBatcher`, concurrent calls are scored together (see batching), each parsed and
checked on its own first, so a bad call fails alone.

The model is trained continuously, so it has one servable version, 1, which always
holds the latest parameters; a request pinned to another version is NOT_FOUND.

Besides the features, a call may send `request_id` (string) and `event_time` (seconds
since the epoch: double, float or int64), each of shape [], [1] or [batch]. A call with a
request_id is logged as impressions (one per candidate) when the server has an
`ImpressionLog`; `event_time` stamps them (else the server's clock does). Its request ids
and the item ids of its candidates must pass the id rule (`monolith.streams.ids`), or the
call is INVALID_ARGUMENT before anything is scored or logged.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, predict_pb2, prediction_service_pb2_grpc

from monolith.common.errors import FailedPrecondition, InvalidArgument, NotFound
from monolith.serving.batching import PredictBatcher
from monolith.serving.impressions import EVENT_TIME, REQUEST_ID, ImpressionLog, ScoredRequest, request_keys
from monolith.serving.limits import Deadline
from monolith.serving.model import ServingModel
from monolith.serving.tensors import decode_inputs, float_tensor

SERVICE_NAME = "tensorflow.serving.PredictionService"
SERVABLE_VERSION = 1
SCORES = "scores"


@dataclasses.dataclass(frozen=True)
class SignatureConfig:
    """Names the Predict API answers to.

    Attributes:
        model_name: the model name clients put in model_spec.name.
        signature_name: the signature clients put in model_spec.signature_name ("" means it).
    """

    model_name: str = "monolith"
    signature_name: str = "serving_default"


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify, Regress and MultiInference are UNIMPLEMENTED.

    Args:
        model: the served model.
        signature: the names the API answers to.
        impressions: where calls with a request_id are logged (None: not logged).
        batcher: scores concurrent calls together (None: each call on its own thread).
    """

    def __init__(
        self,
        model: ServingModel,
        signature: SignatureConfig,
        impressions: ImpressionLog | None = None,
        batcher: PredictBatcher | None = None,
    ) -> None:
        self._model = model
        self._signature = signature
        self._impressions = impressions
        self._batcher = batcher

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        self._check_model_spec(request.model_spec, signature_matters=True)
        unknown_outputs = sorted(set(request.output_filter) - {SCORES})
        if unknown_outputs:
            raise InvalidArgument(f"output tensor alias not found in signature: {', '.join(unknown_outputs)}")
        received_at = time.time()
        deadline = Deadline.after(context.time_remaining())
        inputs = decode_inputs(request.inputs, self._model.limits, deadline, numeric=(EVENT_TIME,))
        request_id, event_time = inputs.pop(REQUEST_ID, None), inputs.pop(EVENT_TIME, None)
        deadline.check("before parsing the features")
        ids, row_splits, batch = self._model.parse(inputs)
        item = self._model.config.item_feature
        keys = request_keys(request_id, event_time, (item, inputs[item]) if item else None, batch)
        if self._batcher is None:
            scores, version = self._model.score_versioned(ids, row_splits, batch, deadline)
        else:
            cancelled = threading.Event()
            context.add_callback(cancelled.set)  # also runs when the call ends normally: harmless
            scores, version = self._batcher.score(ids, row_splits, batch, deadline, cancelled)
        if keys is not None and self._impressions is not None:
            self._impressions.log(ScoredRequest(keys, inputs, scores, version, received_at))
        response = predict_pb2.PredictResponse(model_spec=self._response_spec())
        response.outputs[SCORES].CopyFrom(float_tensor(scores))
        return response

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        self._check_model_spec(request.model_spec, signature_matters=False)
        fields = set(request.metadata_field)
        if fields != {"signature_def"}:
            raise InvalidArgument(f"metadata_field must be ['signature_def'], got {sorted(fields)}")
        signatures = get_model_metadata_pb2.SignatureDefMap()
        signatures.signature_def[self._signature.signature_name].CopyFrom(self._signature_def())
        response = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=self._response_spec())
        response.metadata["signature_def"].Pack(signatures)
        return response

    def _check_model_spec(self, spec: model_pb2.ModelSpec, signature_matters: bool) -> None:
        if not spec.name:
            raise InvalidArgument("Missing ModelSpec name: set model_spec.name")
        if spec.name != self._signature.model_name:
            raise NotFound(f"Servable not found for request: Latest({spec.name})")
        if spec.HasField("version") and spec.version.value != SERVABLE_VERSION:
            raise NotFound(f"Servable not found for request: Specific({spec.name}, {spec.version.value})")
        if spec.version_label:
            raise NotFound(f"Servable not found for request: Label({spec.name}, {spec.version_label})")
        if signature_matters and spec.signature_name not in ("", self._signature.signature_name):
            raise FailedPrecondition(f'Serving signature key "{spec.signature_name}" not found.')

    def _response_spec(self) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self._signature.model_name, signature_name=self._signature.signature_name)
        spec.version.value = SERVABLE_VERSION
        return spec

    def _signature_def(self) -> meta_graph_pb2.SignatureDef:
        signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        for feature in self._model.config.features:
            info = signature.inputs[feature.source]
            info.name = f"{feature.source}:0"
            info.dtype = types_pb2.DT_STRING  # int64 is accepted too; values are hashed by their text
            info.tensor_shape.CopyFrom(_shape([-1, -1] if feature.multi_valued else [-1]))
        request_id = signature.inputs[REQUEST_ID]
        request_id.name, request_id.dtype = f"{REQUEST_ID}:0", types_pb2.DT_STRING
        request_id.tensor_shape.CopyFrom(_shape([-1]))
        event_time = signature.inputs[EVENT_TIME]  # seconds since the epoch; double, float or int64
        event_time.name, event_time.dtype = f"{EVENT_TIME}:0", types_pb2.DT_DOUBLE
        event_time.tensor_shape.CopyFrom(_shape([-1]))
        scores = signature.outputs[SCORES]
        scores.name, scores.dtype = f"{SCORES}:0", types_pb2.DT_FLOAT
        scores.tensor_shape.CopyFrom(_shape([-1]))
        return signature


def _shape(dims: list[int]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
