"""What goes on the wire: Predict and GetModelMetadata requests in TF Serving's messages, the
scores out of a response, ReportActions requests; and the three methods' paths.

Plain functions shared by the blocking and the asyncio client.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from monolith_client._proto import joiner_pb2
from monolith_client._proto import tf_serving_pb2 as tfs

# An action as `report_actions` takes it: a dict of `report_action`'s arguments, or a tuple
# of them in order (request_id, item_id[, kind[, label[, event_time]]]).
ActionLike = Union[Mapping[str, Any], Sequence[Any]]
ACTION_FIELDS = ("request_id", "item_id", "kind", "label", "event_time")
SIGNATURE_DEF_MAP = "type.googleapis.com/tensorflow.serving.SignatureDefMap"


class Method(NamedTuple):
    """A unary method: its path, how its request is written and its response read."""

    path: str
    serialize: Callable[[Any], bytes]
    deserialize: Callable[[bytes], Any]


PREDICT = Method("/tensorflow.serving.PredictionService/Predict", tfs.PredictRequest.SerializeToString,
                 tfs.PredictResponse.FromString)  # fmt: skip
GET_MODEL_METADATA = Method("/tensorflow.serving.PredictionService/GetModelMetadata",
                            tfs.GetModelMetadataRequest.SerializeToString, tfs.GetModelMetadataResponse.FromString)  # fmt: skip
REPORT_ACTIONS = Method("/monolith.api.joiner.v1.SampleJoiner/ReportActions",
                        joiner_pb2.ReportActionsRequest.SerializeToString, joiner_pb2.ReportActionsResponse.FromString)  # fmt: skip


def score_features(user: Mapping[str, Any], candidates: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """`score`'s arguments as `predict`'s features: the user's sent once (broadcast by the server)."""
    sizes = {name: len(values) for name, values in candidates.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"candidate features differ in length: {sizes}")
    if sizes and not any(sizes.values()):
        raise ValueError("no candidates to score")
    features: dict[str, Any] = {name: [value] for name, value in user.items()}
    features.update(candidates)
    return features


def predict_request(model_name: str, signature_name: str, features: Mapping[str, Any],
                    request_id: Optional[str] = None,
                    event_time: Union[float, Sequence[float], None] = None) -> tfs.PredictRequest:  # fmt: skip
    """The PredictRequest of `predict`'s arguments (see `MonolithClient.predict`)."""
    request = tfs.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for name, values in features.items():
        request.inputs[name].CopyFrom(tensor(values))
    if request_id is not None:
        request.inputs["request_id"].CopyFrom(_strings(np.asarray([str(request_id)], dtype=object)))
    if event_time is not None:
        # float64: a float32 second since the epoch is only good to about two minutes.
        request.inputs["event_time"].CopyFrom(_numbers(np.asarray(event_time, dtype="<f8").reshape(-1), tfs.DT_DOUBLE))
    return request


def scores(response: tfs.PredictResponse) -> np.ndarray:
    """The float32 "scores" output of a PredictResponse."""
    if "scores" not in response.outputs:
        raise ValueError(f"the response has no 'scores' output (it has {sorted(response.outputs)})")
    return to_numpy(response.outputs["scores"])


def metadata_request(model_name: str) -> tfs.GetModelMetadataRequest:
    request = tfs.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model_name
    return request


def input_names(response: tfs.GetModelMetadataResponse, signature_name: str) -> list[str]:
    """The signature's input names out of a GetModelMetadata response."""
    packed = response.metadata["signature_def"]
    if packed.type_url != SIGNATURE_DEF_MAP:
        raise ValueError(f"signature_def metadata holds {packed.type_url!r}, not a SignatureDefMap")
    signatures = tfs.SignatureDefMap.FromString(packed.value)
    if signature_name not in signatures.signature_def:
        raise ValueError(f"no signature {signature_name!r} (the model has {sorted(signatures.signature_def)})")
    return sorted(signatures.signature_def[signature_name].inputs)


def actions_request(actions: Sequence[ActionLike], now: Optional[float] = None) -> joiner_pb2.ReportActionsRequest:
    """The ReportActionsRequest of `report_actions`' actions; an action without a time gets `now`."""
    if isinstance(actions, (str, bytes, Mapping)):
        raise ValueError(f"report_actions takes a list of actions, got one: {actions!r}")
    now = time.time() if now is None else now
    request = joiner_pb2.ReportActionsRequest()
    for action in actions:
        fields = action_fields(action)
        event_time = fields.get("event_time")
        request.actions.add(
            request_id=str(fields["request_id"]), item_id=str(fields["item_id"]), kind=str(fields.get("kind", "click")),
            label=float(fields.get("label", 1.0)), event_time=now if event_time is None else float(event_time),
        )  # fmt: skip
    return request


def action_fields(action: ActionLike) -> dict[str, Any]:
    """An action's fields by name, from a dict or a tuple in `report_action`'s order."""
    if isinstance(action, (str, bytes)):
        raise ValueError(f"an action is a dict or a tuple (request_id, item_id, ...), got {action!r}")
    if isinstance(action, Mapping):
        unknown = set(action) - set(ACTION_FIELDS)
        if unknown:
            raise ValueError(f"unknown action field(s) {sorted(unknown)}; known: {', '.join(ACTION_FIELDS)}")
        fields = dict(action)
    else:
        if not 2 <= len(action) <= len(ACTION_FIELDS):
            raise ValueError(f"an action tuple is (request_id, item_id[, kind[, label[, event_time]]]), got {action!r}")
        fields = dict(zip(ACTION_FIELDS, action))
    for name in ("request_id", "item_id"):
        if fields.get(name) is None or fields[name] == "":
            raise ValueError(f"an action needs a non-empty {name}, got {action!r}")
    return {name: value for name, value in fields.items() if value is not None}


# ----------------------------------------------------------------------------- tensors


def tensor(values: Any) -> tfs.TensorProto:
    """A feature's TensorProto: integer ids as int64, anything else as its text; a list of lists
    (a multi-valued feature) as a string matrix, rows padded with ""."""
    if _is_ragged(values):
        rows = [[row] if isinstance(row, (str, bytes)) else list(row) for row in values]  # a lone value: a row of one
        width = max(len(row) for row in rows)
        padded = [[v if isinstance(v, bytes) else str(v) for v in row] + [""] * (width - len(row)) for row in rows]
        return _strings(np.asarray(padded, dtype=object))
    array = np.asarray(values)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.dtype.kind in "iu":
        return _numbers(array.astype("<i8"), tfs.DT_INT64)
    return _strings(array.astype(object))


def to_numpy(proto: tfs.TensorProto) -> np.ndarray:
    """A numeric TensorProto as an array of its shape (from tensor_content or the typed field)."""
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    kinds = {tfs.DT_FLOAT: ("<f4", "float_val"), tfs.DT_DOUBLE: ("<f8", "double_val"),
             tfs.DT_INT64: ("<i8", "int64_val"), tfs.DT_INT32: ("<i4", "int_val")}  # fmt: skip
    if proto.dtype not in kinds:
        raise ValueError(f"cannot read a tensor of dtype {proto.dtype} (float, double, int32 or int64 expected)")
    dtype, field = kinds[proto.dtype]
    if proto.tensor_content:
        values = np.frombuffer(proto.tensor_content, dtype=dtype).copy()  # writable, like the typed fields
    else:
        values = np.asarray(getattr(proto, field), dtype=dtype)
        count = int(np.prod(shape)) if shape else 1
        if values.size == 1 and count > 1:  # one value stands for all (TF's short form)
            values = np.full(count, values[0], dtype=dtype)
    return values.reshape(shape)


def _numbers(array: np.ndarray, dtype: int) -> tfs.TensorProto:
    proto = tfs.TensorProto(dtype=dtype, tensor_content=array.tobytes())
    proto.tensor_shape.dim.extend(tfs.TensorShapeProto.Dim(size=n) for n in array.shape)
    return proto


def _strings(array: np.ndarray) -> tfs.TensorProto:
    proto = tfs.TensorProto(dtype=tfs.DT_STRING)
    proto.tensor_shape.dim.extend(tfs.TensorShapeProto.Dim(size=n) for n in array.shape)
    proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
    return proto


def _is_ragged(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and any(isinstance(row, (list, tuple, np.ndarray)) for row in values)
