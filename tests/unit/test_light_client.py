"""monolith_client without TensorFlow: its wire messages against TF Serving's own, the tensors it
writes and reads, its channel options, retries and per-call metadata, and an import that loads
neither TensorFlow nor the server package. (Against real servers: test_client_actions,
test_predict_api, test_server_tls; from a fresh virtual environment: e2e/test_light_client_venv.)"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, predict_pb2
from monolith.api.joiner.v1 import joiner_pb2
from monolith.common.channel import ChannelConfig
from monolith.serving.limits import RequestLimits
from monolith.serving.tensors import decode_inputs
from monolith_client import MonolithClient, PredictError, messages
from monolith_client._proto import tf_serving_pb2 as tfs
from monolith_client.channel import OPTIONS, Tls
from monolith_client.retry import Backoff

CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "python"
# Each message of the client's file, and TF Serving's or TensorFlow's own it stands for.
OFFICIAL = {
    tfs.TensorShapeProto: tf.make_tensor_proto([1]).tensor_shape.__class__,
    tfs.TensorProto: tf.make_tensor_proto([1]).__class__,
    tfs.ModelSpec: model_pb2.ModelSpec,
    tfs.PredictRequest: predict_pb2.PredictRequest,
    tfs.PredictResponse: predict_pb2.PredictResponse,
    tfs.GetModelMetadataRequest: get_model_metadata_pb2.GetModelMetadataRequest,
    tfs.GetModelMetadataResponse: get_model_metadata_pb2.GetModelMetadataResponse,
    tfs.SignatureDefMap: get_model_metadata_pb2.SignatureDefMap,
    tfs.SignatureDef: meta_graph_pb2.SignatureDef,
    tfs.TensorInfo: meta_graph_pb2.TensorInfo,
}


def _same_fields(ours: Descriptor, theirs: Descriptor) -> None:
    official = {f.name: f for f in theirs.fields}
    for field in ours.fields:
        assert field.name in official, f"{ours.full_name}.{field.name} is not a field of {theirs.full_name}"
        other = official[field.name]
        where = f"{ours.full_name}.{field.name}"
        assert (field.number, field.type, field.is_repeated) == (other.number, other.type, other.is_repeated), where
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:  # a map: its key and value types
                _same_fields(field.message_type, other.message_type)
            else:
                assert field.message_type.name == other.message_type.name, where
        if field.type == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type.name == other.enum_type.name, where


def test_every_field_of_the_clients_messages_is_tf_servings_field_for_field() -> None:
    for ours, theirs in OFFICIAL.items():
        _same_fields(ours.DESCRIPTOR, theirs.DESCRIPTOR)
    _same_fields(tfs.TensorShapeProto.Dim.DESCRIPTOR, tf.make_tensor_proto([1]).tensor_shape.dim.add().DESCRIPTOR)
    for value in tfs.DataType.DESCRIPTOR.values:
        assert types_pb2.DataType.Value(value.name) == value.number, value.name


FEATURES = {
    "user_id": [196], "gender": ["M"], "age": [49.0],
    "movie_id": np.array([242, 302, 377]), "genres": [["Comedy"], ["Crime", "Film-Noir"], ["Action"]],
}  # fmt: skip


def test_a_predict_request_reads_as_tf_servings_and_as_the_server_decodes_it() -> None:
    request = messages.predict_request("monolith", "serving_default", FEATURES, request_id="r-1",
                                       event_time=[880_000_000.25, 880_000_001.5, 880_000_002.0])  # fmt: skip
    official = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert (official.model_spec.name, official.model_spec.signature_name) == ("monolith", "serving_default")
    expected = {
        "user_id": np.array([196]), "gender": np.array([b"M"]), "age": np.array([b"49.0"]),
        "movie_id": np.array([242, 302, 377]), "request_id": np.array([b"r-1"]),
        "genres": np.array([[b"Comedy", b""], [b"Crime", b"Film-Noir"], [b"Action", b""]]),
        "event_time": np.array([880_000_000.25, 880_000_001.5, 880_000_002.0]),
    }  # fmt: skip
    assert sorted(official.inputs) == sorted(expected)
    decoded = decode_inputs(official.inputs, RequestLimits(), numeric=("event_time",))
    for name, values in expected.items():
        np.testing.assert_array_equal(tf.make_ndarray(official.inputs[name]), values, err_msg=name)
        as_decoded = np.char.decode(values).astype(object) if values.dtype.kind == "S" else values  # the server's str
        np.testing.assert_array_equal(decoded[name], as_decoded, err_msg=name)
    assert official.inputs["movie_id"].dtype == types_pb2.DT_INT64
    assert official.inputs["event_time"].dtype == types_pb2.DT_DOUBLE


def test_scores_are_read_from_tensor_content_or_float_val() -> None:
    for proto in (tf.make_tensor_proto(np.array([0.25, 0.5], np.float32)),
                  tf.make_tensor_proto([0.25, 0.5], dtype=tf.float32, shape=[2])):  # fmt: skip
        response = predict_pb2.PredictResponse()
        response.outputs["scores"].CopyFrom(proto)
        scores = messages.scores(tfs.PredictResponse.FromString(response.SerializeToString()))
        assert scores.dtype == np.float32 and scores.tolist() == [0.25, 0.5]
    one_for_all = predict_pb2.PredictResponse()
    one_for_all.outputs["scores"].CopyFrom(tf.make_tensor_proto(0.5, dtype=tf.float32, shape=[3]))
    assert messages.scores(tfs.PredictResponse.FromString(one_for_all.SerializeToString())).tolist() == [0.5] * 3
    with pytest.raises(ValueError, match="no 'scores' output"):
        messages.scores(tfs.PredictResponse())


def test_input_names_come_from_tf_servings_signature_def_map() -> None:
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for name in ("user_id", "movie_id"):
        signatures.signature_def["serving_default"].inputs[name].dtype = types_pb2.DT_INT64
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.metadata["signature_def"].Pack(signatures)
    ours = tfs.GetModelMetadataResponse.FromString(response.SerializeToString())
    assert messages.input_names(ours, "serving_default") == ["movie_id", "user_id"]
    with pytest.raises(ValueError, match="no signature 'other'"):
        messages.input_names(ours, "other")


def test_actions_are_the_joiners_messages() -> None:
    request = messages.actions_request([("r1", 302), {"request_id": "r2", "item_id": "x", "kind": "dislike",
                                                      "label": 0.0, "event_time": 5.0}], now=100.0)  # fmt: skip
    official = joiner_pb2.ReportActionsRequest.FromString(request.SerializeToString())
    assert [(a.request_id, a.item_id, a.kind, a.label, a.event_time) for a in official.actions] == [
        ("r1", "302", "click", 1.0, 100.0), ("r2", "x", "dislike", 0.0, 5.0)]  # fmt: skip
    for bad, message in (([("r1",)], "an action tuple"), ([{"request_id": "r", "item_id": ""}], "non-empty item_id"),
                         ([{"request_id": "r", "item": "x"}], "unknown action field")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            messages.actions_request(bad)


def test_the_clients_channel_options_are_the_server_packages() -> None:
    expected = ChannelConfig(fast_reconnect=True).options()
    assert sorted(OPTIONS) == sorted(expected)


def test_tls_files_are_checked_when_the_client_is_made(tmp_path) -> None:
    with pytest.raises(ValueError, match="tls_ca: cannot read .*missing.pem"):
        MonolithClient("127.0.0.1:1", tls_ca=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="needs both tls_cert and tls_key"):
        Tls(cert="c.pem")


def test_backoff_waits_grow_to_their_cap_with_jitter_above_a_floor() -> None:
    backoff = Backoff(retries=5, initial=0.1, multiplier=3.0, maximum=1.0)
    for attempt, cap in ((1, 0.1), (2, 0.3), (3, 0.9), (4, 1.0), (5, 1.0)):
        waits = [backoff.delay(attempt) for _ in range(200)]
        assert cap / 2 <= min(waits) and max(waits) <= cap and max(waits) - min(waits) > cap / 4
    with pytest.raises(ValueError):
        Backoff(retries=-1)


def test_malformed_calls_are_refused_before_any_is_sent() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        messages.score_features({"user_id": 1}, {"movie_id": [], "genres": []})
    with pytest.raises(ValueError, match="a dict or a tuple .*got 'r1'"):
        messages.actions_request(("r1", 302))  # one action where a list of them belongs
    with pytest.raises(ValueError, match="takes a list of actions"):
        messages.actions_request({"request_id": "r1", "item_id": 302})


def test_ragged_rows_keep_bytes_and_lone_strings_as_values() -> None:
    proto = messages.tensor([[b"Comedy"], "Drama", ["Crime", "Film-Noir"]])
    assert list(proto.string_val) == [b"Comedy", b"", b"Drama", b"", b"Crime", b"Film-Noir"]
    assert [d.size for d in proto.tensor_shape.dim] == [3, 2]


def test_scores_are_writable() -> None:
    response = predict_pb2.PredictResponse()
    response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.array([0.5, 0.25], np.float32)))
    scores = messages.scores(tfs.PredictResponse.FromString(response.SerializeToString()))
    scores.sort()
    assert scores.tolist() == [0.25, 0.5]


class _Recorder:
    """A Predict endpoint (a generic handler on a real gRPC server) that fails its first
    `failures` calls with `code`, then scores 0.5, recording each call's metadata."""

    def __init__(self, failures: int, code: grpc.StatusCode) -> None:
        self.failures, self.code = failures, code
        self.calls: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def predict(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls.append(dict(context.invocation_metadata()))
            failing = len(self.calls) <= self.failures
        if failing:
            context.abort(self.code, "not now")
        response = predict_pb2.PredictResponse()
        response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.full(3, 0.5, np.float32)))
        return response.SerializeToString()


@pytest.fixture
def recorder_server() -> Iterator[tuple[str, list[_Recorder]]]:
    recorders: list[_Recorder] = []
    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
        "Predict": grpc.unary_unary_rpc_method_handler(lambda request, context: recorders[-1].predict(request, context)),
    })  # fmt: skip
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", recorders
    server.stop(0)


def test_unavailable_is_retried_with_the_metadata_of_the_client_and_the_call(recorder_server) -> None:
    address, recorders = recorder_server
    recorders.append(_Recorder(failures=2, code=grpc.StatusCode.UNAVAILABLE))
    with MonolithClient(address, metadata=[("authorization", "Bearer t0ken")], retries=2) as client:
        scores = client.predict(FEATURES, metadata=[("x-request-source", "test")])
    assert scores.tolist() == [0.5] * 3 and len(recorders[-1].calls) == 3
    assert all(c["authorization"] == "Bearer t0ken" and c["x-request-source"] == "test" for c in recorders[-1].calls)

    recorders.append(_Recorder(failures=5, code=grpc.StatusCode.UNAVAILABLE))
    with MonolithClient(address, retries=1) as client, pytest.raises(PredictError) as caught:
        client.predict(FEATURES)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and len(recorders[-1].calls) == 2


def test_a_callers_error_is_not_retried(recorder_server) -> None:
    address, recorders = recorder_server
    recorders.append(_Recorder(failures=1, code=grpc.StatusCode.INVALID_ARGUMENT))
    with MonolithClient(address, retries=3) as client, pytest.raises(PredictError) as caught:
        client.predict(FEATURES)
    assert (caught.value.code, caught.value.details) == (grpc.StatusCode.INVALID_ARGUMENT, "not now")
    assert len(recorders[-1].calls) == 1


BLOCKER = """
import importlib.abc, sys, time
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_serving", "monolith"):
            raise ImportError(f"{name} must not be imported by the light client")
sys.meta_path.insert(0, Block())
started = time.perf_counter()
import monolith_client
from monolith_client import AsyncMonolithClient, messages
request = messages.predict_request("m", "s", {"movie_id": [1, 2], "genres": [["a"], ["b", "c"]]}, "r")
print(len(request.SerializeToString()), sorted(m for m in sys.modules if m.startswith("grpc"))[:1])
"""


def test_the_client_imports_and_builds_requests_with_no_tensorflow_and_no_server_package() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=60,
                            cwd=CLIENT_DIR)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].isdigit()
