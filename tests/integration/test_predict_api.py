"""The Predict API over gRPC, seen by a plain TF Serving client.

Real servers on free ports in this process: two training embedding-PS shards, a dense-PS,
a trainer that has trained a few hundred MovieLens examples, and model-serving reading the
training shards directly. Requests are built with nothing but `tf.make_tensor_proto` and
the official `PredictionServiceStub`; the reference for every score is `ServingModel.predict`
in this process on the same inputs.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from helpers.cluster import Cluster, start_cluster
from helpers.models import small_config
from helpers.waiting import wait_for
from monolith.common.errors import DeadlineExceeded
from monolith.common.server import MonolithServer, ServerConfig
from monolith.data.batch import Batch
from monolith.data.feature_ids import feature_id, feature_ids
from monolith.data.movielens import load_movielens, raw_feature_values
from monolith.dense_ps.client import DensePSClient
from monolith.dense_ps.service import build_dense_ps
from monolith.dense_ps.store import DenseStore
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.embedding_ps.service import build_embedding_ps
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig
from monolith.model.config import ModelConfig
from monolith.serving.limits import Deadline
from monolith.serving.model import ServingModel
from monolith.serving.service import build_serving
from monolith.serving.servicer import PredictionServicer, SignatureConfig
from monolith.trainer.worker import TrainerWorker
from monolith_client import MonolithClient, PredictError

Features = dict[str, np.ndarray]
USER_FEATURES = ("user_id", "age", "gender", "occupation", "zip")
CODE = grpc.StatusCode
TIMEOUT = 10.0


@dataclasses.dataclass
class Stack:
    config: ModelConfig
    data: Batch
    cluster: Cluster
    dense_server: MonolithServer
    worker: TrainerWorker
    model: ServingModel
    server: MonolithServer
    stub: prediction_service_pb2_grpc.PredictionServiceStub


def model_config() -> ModelConfig:
    return small_config()


def serving_model(config: ModelConfig, shards: list[str], dense: str) -> ServingModel:
    sparse = ShardedEmbeddingClient(shards, config.table_dims(), timeout=TIMEOUT)
    model = ServingModel(config, sparse, DensePSClient(dense, timeout=TIMEOUT))
    assert model.refresh_dense()
    return model


def serve(model: ServingModel, max_concurrent_rpcs: int | None = 64) -> MonolithServer:
    server = build_serving(
        model,
        SignatureConfig(),
        ServerConfig(host="127.0.0.1", port=0, metrics_port=None, max_concurrent_rpcs=max_concurrent_rpcs),
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    config = model_config()
    data = load_movielens(limit=600)
    cluster = start_cluster(num_shards=2, tables=config.tables())
    dense_server = build_dense_ps(DenseStore(config.model.optimizer), ServerConfig(port=0, metrics_port=None))
    dense_server.start()
    sparse = ShardedEmbeddingClient(cluster.addresses, config.table_dims(), timeout=TIMEOUT)
    worker = TrainerWorker(config, sparse, DensePSClient(dense_server.address, timeout=TIMEOUT))
    for batch in data.slice(0, 512).batches(128):
        worker.train(batch)
    model = serving_model(config, cluster.addresses, dense_server.address)
    server = serve(model)
    channel = grpc.insecure_channel(server.address)
    yield Stack(config, data, cluster, dense_server, worker, model, server,
                prediction_service_pb2_grpc.PredictionServiceStub(channel))  # fmt: skip
    channel.close()
    server.stop(grace=0)
    worker.close()
    dense_server.stop(grace=0)
    cluster.stop()


@pytest.fixture(scope="module")
def raw() -> dict[str, list[dict[str, Any]]]:
    return raw_feature_values()


def raw_examples(raw: dict[str, list[dict[str, Any]]], data: Batch, start: int, stop: int) -> Features:
    """Raw features of data[start:stop]: ints as int64, strings as object arrays, genres padded with ""."""
    users = {feature_id("user_id", u["user_id"]): u for u in raw["users"]}
    movies = {feature_id("movie_id", m["movie_id"]): m for m in raw["movies"]}
    rows_u = [users[int(i)] for i in data.ids["user_id"][start:stop]]
    rows_m = [movies[int(i)] for i in data.ids["movie_id"][start:stop]]
    width = max(len(m["genres"]) for m in rows_m)
    out: Features = {"user_id": np.array([u["user_id"] for u in rows_u], np.int64)}
    for name in ("age", "gender", "occupation", "zip"):
        out[name] = np.array([u[name] for u in rows_u], dtype=object)
    out["movie_id"] = np.array([m["movie_id"] for m in rows_m], np.int64)
    out["genres"] = np.array([m["genres"] + [""] * (width - len(m["genres"])) for m in rows_m], dtype=object)
    return out


def request_of(features: Features, name: str = "monolith", signature: str = "serving_default",
               request_id: str | None = "r-1") -> predict_pb2.PredictRequest:  # fmt: skip
    """A PredictRequest built the way any TF Serving client builds one."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    for feature, values in features.items():
        request.inputs[feature].CopyFrom(tf.make_tensor_proto(values))
    if request_id is not None:
        request.inputs["request_id"].CopyFrom(tf.make_tensor_proto([request_id]))
    return request


def scores_of(
    stub: prediction_service_pb2_grpc.PredictionServiceStub, request: predict_pb2.PredictRequest
) -> np.ndarray:
    response = stub.Predict(request, timeout=TIMEOUT)
    assert list(response.outputs) == ["scores"]
    return tf.make_ndarray(response.outputs["scores"])


@pytest.fixture(scope="module")
def examples(raw: dict[str, list[dict[str, Any]]], stack: Stack) -> Features:
    return raw_examples(raw, stack.data, 0, 32)


def assert_serves_correctly(stack: Stack, examples: Features) -> None:
    scores = scores_of(stack.stub, request_of(examples))
    np.testing.assert_allclose(scores, stack.model.predict(examples), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- scores


def test_scores_equal_the_in_process_model(stack: Stack, examples: Features) -> None:
    response = stack.stub.Predict(request_of(examples), timeout=TIMEOUT)

    scores = tf.make_ndarray(response.outputs["scores"])
    assert response.outputs["scores"].dtype == types_pb2.DT_FLOAT
    assert scores.dtype == np.float32 and scores.shape == (32,)
    np.testing.assert_allclose(scores, stack.model.predict(examples), rtol=0, atol=1e-6)
    assert np.std(scores) > 0.005  # trained rows are read, not just zeros
    spec = response.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == ("monolith", 1, "serving_default")


def test_scores_equal_the_trainers_predictions(stack: Stack, examples: Features) -> None:
    stack.model.refresh_dense()
    stack.worker.refresh_dense()
    expected = stack.worker.predict(stack.data.slice(0, 32))

    np.testing.assert_allclose(scores_of(stack.stub, request_of(examples)), expected, rtol=0, atol=1e-6)


def test_a_ranking_call_sends_the_user_once(stack: Stack, examples: Features) -> None:
    user = {name: examples[name][:1] for name in USER_FEATURES}
    candidates = {name: examples[name][:7] for name in ("movie_id", "genres")}
    repeated = {**{name: np.repeat(user[name], 7) for name in USER_FEATURES}, **candidates}

    scores = scores_of(stack.stub, request_of({**user, **candidates}))

    assert scores.shape == (7,)
    np.testing.assert_allclose(scores, stack.model.predict(repeated), rtol=0, atol=1e-6)


def test_the_default_signature_version_1_and_the_scores_filter_are_accepted(stack: Stack, examples: Features) -> None:
    expected = stack.model.predict(examples)
    request = request_of(examples, signature="", request_id=None)
    request.model_spec.version.value = 1
    request.output_filter.append("scores")

    np.testing.assert_allclose(scores_of(stack.stub, request), expected, rtol=0, atol=1e-6)


def test_int64_and_string_ids_score_the_same_over_the_wire(stack: Stack, examples: Features) -> None:
    as_strings = {**examples, **{n: examples[n].astype(str).astype(object) for n in ("user_id", "movie_id")}}
    as_int32 = {**examples, "movie_id": examples["movie_id"].astype(np.int32)}

    expected = scores_of(stack.stub, request_of(examples))

    np.testing.assert_array_equal(scores_of(stack.stub, request_of(as_strings)), expected)
    np.testing.assert_array_equal(scores_of(stack.stub, request_of(as_int32)), expected)


def test_model_metadata_lists_every_input_and_the_scores_output(stack: Stack) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "monolith"

    response = stack.stub.GetModelMetadata(request, timeout=TIMEOUT)

    assert response.model_spec.name == "monolith" and response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert list(signatures.signature_def) == ["serving_default"]
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert set(signature.inputs) == {f.source for f in stack.config.features} | {"request_id", "event_time"}
    assert signature.inputs["event_time"].dtype == types_pb2.DT_DOUBLE
    for feature in stack.config.features:
        shape = [d.size for d in signature.inputs[feature.source].tensor_shape.dim]
        assert shape == ([-1, -1] if feature.multi_valued else [-1]), feature.source
    assert list(signature.outputs) == ["scores"]
    assert signature.outputs["scores"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in signature.outputs["scores"].tensor_shape.dim] == [-1]


# --------------------------------------------------------------------------- errors


def _set(**spec: Any) -> Callable[[predict_pb2.PredictRequest], None]:
    def change(request: predict_pb2.PredictRequest) -> None:
        for key, value in spec.items():
            if key == "version":
                request.model_spec.version.value = value
            else:
                setattr(request.model_spec, key, value)

    return change


def _input(name: str, tensor: Any) -> Callable[[predict_pb2.PredictRequest], None]:
    def change(request: predict_pb2.PredictRequest) -> None:
        request.inputs[name].CopyFrom(tensor)

    return change


def _drop(name: str) -> Callable[[predict_pb2.PredictRequest], None]:
    def change(request: predict_pb2.PredictRequest) -> None:
        del request.inputs[name]

    return change


def _filter(*aliases: str) -> Callable[[predict_pb2.PredictRequest], None]:
    return lambda request: request.output_filter.extend(aliases)


def _short_tensor() -> Any:
    """An int64 tensor declaring 32 values with 3 in tensor_content."""
    tensor = tf.make_tensor_proto(np.arange(3, dtype=np.int64))
    tensor.tensor_shape.dim[0].size = 32
    return tensor


def _tensor(values: Any, shape: list[int] | None = None, **fields: Any) -> Any:
    """`tf.make_tensor_proto(values)`, then some fields replaced; `shape` replaces the dims."""
    tensor = tf.make_tensor_proto(values)
    if shape is not None:
        del tensor.tensor_shape.dim[:]
        for size in shape:
            tensor.tensor_shape.dim.add(size=size)
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(tensor, name).extend(value)
        else:
            setattr(tensor, name, value)
    return tensor


def _item_at(index: int, value: str | bytes) -> Callable[[predict_pb2.PredictRequest], None]:
    """The movie ids sent as strings, the one at `index` replaced by `value`."""

    def change(request: predict_pb2.PredictRequest) -> None:
        movies: list[bytes] = [str(m).encode() for m in tf.make_ndarray(request.inputs["movie_id"]).tolist()]
        movies[index] = value if isinstance(value, bytes) else value.encode()
        request.inputs["movie_id"].CopyFrom(tf.make_tensor_proto(np.array(movies, dtype=object)))

    return change


# Ids that could reach a stream header: Predict refuses them before scoring or logging.
HOSTILE_IDS = {
    "CR/LF": ("r\r\nNats-Msg-Id: x", "control characters are not allowed (U+000D at character 1)"),
    "LF": ("r\n", "control characters are not allowed (U+000A at character 1)"),
    "NUL": ("r\x00", "control characters are not allowed (U+0000 at character 1)"),
    "64 KiB": ("r" * 65536, "65536 bytes; at most 256"),
}

BAD_REQUESTS = {
    "empty model name": (_set(name=""), CODE.INVALID_ARGUMENT, "Missing ModelSpec name"),
    "unknown model": (_set(name="ranker"), CODE.NOT_FOUND, "Servable not found for request: Latest(ranker)"),
    "version 7": (_set(version=7), CODE.NOT_FOUND, "Servable not found for request: Specific(monolith, 7)"),
    "version label": (_set(version_label="canary"), CODE.NOT_FOUND, "Label(monolith, canary)"),
    "unknown signature": (
        _set(signature_name="classify"), CODE.FAILED_PRECONDITION, 'Serving signature key "classify" not found.'
    ),
    "float ids": (
        _input("movie_id", tf.make_tensor_proto(np.full(32, 1.5, np.float32))),
        CODE.INVALID_ARGUMENT,
        "input 'movie_id': expects an int64, int32 or string tensor, got DT_FLOAT",
    ),
    "rank 3": (
        _input("movie_id", tf.make_tensor_proto(np.ones((32, 1, 1), np.int64))),
        CODE.INVALID_ARGUMENT,
        "input 'movie_id': expects shape [batch] or [batch, k], got [32, 1, 1]",
    ),
    "outer sizes disagree": (
        _input("movie_id", tf.make_tensor_proto(np.ones(5, np.int64))),
        CODE.INVALID_ARGUMENT,
        "input 'movie_id': outer dimension 5 is neither 1 (broadcast) nor the batch size 32",
    ),
    "several values for a single-valued feature": (
        _input("gender", tf.make_tensor_proto(np.full((32, 3), "M", dtype=object))),
        CODE.INVALID_ARGUMENT,
        "the feature is single-valued",
    ),
    "empty batch": (
        _input("genres", tf.make_tensor_proto(np.zeros((0, 2), dtype="<U1"))),
        CODE.INVALID_ARGUMENT,
        "outer dimension is 0",
    ),
    "values do not fill the shape": (
        _input("user_id", _short_tensor()),
        CODE.INVALID_ARGUMENT,
        "input 'user_id': tensor_content has 24 bytes",
    ),
    "junk tensor_content on a string tensor": (
        _input("zip", _tensor(np.array(["554"] * 32, dtype=object), tensor_content=b"\x07junk\xff")),
        CODE.INVALID_ARGUMENT,
        "input 'zip': a DT_STRING tensor carries its values in string_val; tensor_content",
    ),
    "tensor_content of int64 declared as int32": (
        _input("movie_id", _tensor(np.arange(32, dtype=np.int64), dtype=types_pb2.DT_INT32)),
        CODE.INVALID_ARGUMENT,
        "input 'movie_id': tensor_content has 256 bytes; shape [32] of DT_INT32 needs 128",
    ),
    "tensor_content longer than the shape": (
        _input("movie_id", _tensor(np.arange(33, dtype=np.int64), shape=[32])),
        CODE.INVALID_ARGUMENT,
        "input 'movie_id': tensor_content has 264 bytes; shape [32] of DT_INT64 needs 256",
    ),
    "zero beside a huge dim": (
        _input("genres", _tensor(np.zeros(0, np.int64), shape=[0, 2**62])),
        CODE.INVALID_ARGUMENT,
        "input 'genres': shape [0, 4611686018427387904] is too large",
    ),
    "unknown DataType": (
        _input("movie_id", _tensor(np.arange(32, dtype=np.int64), dtype=999)),
        CODE.INVALID_ARGUMENT,
        "input 'movie_id': expects an int64, int32 or string tensor, got unknown DataType 999",
    ),
    "rank 65": (
        _input("movie_id", _tensor(np.arange(1, dtype=np.int64), shape=[1] * 65)),
        CODE.INVALID_ARGUMENT,
        "input 'movie_id': rank 65 exceeds 32",
    ),
    "more typed values than the shape holds": (
        _input("user_id", _tensor(np.zeros(0, np.int64), shape=[2], int64_val=[1, 2, 3])),
        CODE.INVALID_ARGUMENT,
        "input 'user_id': 3 values do not fill shape [2]",
    ),
    "non-UTF-8 string": (
        _input("zip", tf.make_tensor_proto([b"\xff\xfe"])),
        CODE.INVALID_ARGUMENT,
        "input 'zip': string values must be UTF-8",
    ),
    "unknown input": (
        _input("colour", tf.make_tensor_proto(["red"])), CODE.INVALID_ARGUMENT, "unknown input(s) colour"
    ),
    "missing input": (_drop("zip"), CODE.INVALID_ARGUMENT, "missing input(s) zip"),
    "unknown output alias": (
        _filter("scores", "probabilities"),
        CODE.INVALID_ARGUMENT,
        "output tensor alias not found in signature: probabilities",
    ),
    "float request_id": (
        _input("request_id", tf.make_tensor_proto([0.5])), CODE.INVALID_ARGUMENT, "input 'request_id'"
    ),
    **{f"request_id with {name}": (
        _input("request_id", tf.make_tensor_proto(np.array(["ok", value] * 16, dtype=object))),
        CODE.INVALID_ARGUMENT,
        f"input 'request_id': example 1: {problem}",
    ) for name, (value, problem) in HOSTILE_IDS.items()},
    "request_id not UTF-8": (
        _input("request_id", tf.make_tensor_proto([b"r\xff\xfe"])),
        CODE.INVALID_ARGUMENT,
        "input 'request_id': string values must be UTF-8",
    ),
    **{f"item id with {name}": (
        _item_at(3, value), CODE.INVALID_ARGUMENT, f"input 'movie_id': example 3: {problem}"
    ) for name, (value, problem) in HOSTILE_IDS.items()},
    "item id not UTF-8": (_item_at(3, b"\xc3("), CODE.INVALID_ARGUMENT, "input 'movie_id': string values must be UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_tf_servings_status_and_the_server_carries_on(
    stack: Stack, examples: Features, case: str
) -> None:
    change, code, message = BAD_REQUESTS[case]
    request = request_of(examples)
    change(request)

    with pytest.raises(grpc.RpcError) as info:
        stack.stub.Predict(request, timeout=TIMEOUT)

    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert_serves_correctly(stack, examples)


def test_long_names_are_echoed_cut_and_keep_their_status(stack: Stack, examples: Features) -> None:
    """Regression: a 100,000-character name in the message pushed the status past gRPC's
    metadata limit; the client saw RESOURCE_EXHAUSTED "Stream removed"."""
    long_input = request_of(examples)
    long_input.inputs["i" * 100_000].CopyFrom(tf.make_tensor_proto(["x"]))
    long_model = request_of(examples, name="m" * 100_000)
    long_alias = request_of(examples)
    long_alias.output_filter.append("a" * 100_000)

    for request, code in ((long_input, CODE.INVALID_ARGUMENT), (long_model, CODE.NOT_FOUND),
                          (long_alias, CODE.INVALID_ARGUMENT)):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            stack.stub.Predict(request, timeout=TIMEOUT)
        assert info.value.code() == code, info.value.details()[:200]
        assert len(info.value.details()) <= 512
    assert_serves_correctly(stack, examples)


def test_metadata_errors(stack: Stack) -> None:
    def metadata(name: str, fields: list[str]) -> grpc.RpcError:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
        request.model_spec.name = name
        with pytest.raises(grpc.RpcError) as info:
            stack.stub.GetModelMetadata(request, timeout=TIMEOUT)
        return info.value

    assert metadata("ranker", ["signature_def"]).code() == CODE.NOT_FOUND
    assert metadata("", ["signature_def"]).code() == CODE.INVALID_ARGUMENT
    error = metadata("monolith", [])
    assert error.code() == CODE.INVALID_ARGUMENT and "metadata_field must be ['signature_def']" in error.details()


@pytest.mark.parametrize(
    ("method", "request_type"),
    [
        ("Classify", classification_pb2.ClassificationRequest),
        ("Regress", regression_pb2.RegressionRequest),
        ("MultiInference", inference_pb2.MultiInferenceRequest),
    ],
)
def test_the_other_prediction_service_methods_are_unimplemented(stack: Stack, method: str, request_type: Any) -> None:
    """Classify, Regress and MultiInference answer UNIMPLEMENTED, as the servicer promises.

    Regression: the generated base method sets UNIMPLEMENTED and then raises
    NotImplementedError, and the error interceptor once mapped that exception to INTERNAL
    ("internal error: NotImplementedError: Method not implemented!"), discarding the code
    the handler had set.
    """
    with pytest.raises(grpc.RpcError) as info:
        getattr(stack.stub, method)(request_type(), timeout=TIMEOUT)

    assert info.value.code() == CODE.UNIMPLEMENTED, info.value.details()


def test_overload_is_resource_exhausted(stack: Stack, raw: dict[str, list[dict[str, Any]]]) -> None:
    server = serve(stack.model, max_concurrent_rpcs=1)
    big = raw_examples(raw, stack.data, 0, 600)
    big = {name: np.concatenate([values] * 10) for name, values in big.items()}  # 6,000 examples
    request = request_of(big)
    expected = stack.model.predict(big)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            scores_of(stub, request)  # connected, warm
            for _ in range(3):  # timing dependent: retry a round in which nothing overlapped
                start = threading.Barrier(16)

                def call() -> tuple[CODE, str, np.ndarray | None]:
                    start.wait()
                    try:
                        return CODE.OK, "", scores_of(stub, request)
                    except grpc.RpcError as exc:
                        return exc.code(), exc.details(), None

                with futures.ThreadPoolExecutor(16) as pool:
                    results = list(pool.map(lambda _: call(), range(16)))
                codes = [code for code, _, _ in results]
                if CODE.RESOURCE_EXHAUSTED in codes:
                    break
            assert set(codes) == {CODE.OK, CODE.RESOURCE_EXHAUSTED}, codes
            for code, details, scores in results:
                if code == CODE.OK:
                    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)  # type: ignore[arg-type]
                else:
                    assert "Concurrent RPC limit exceeded" in details
            np.testing.assert_allclose(scores_of(stub, request), expected, rtol=0, atol=1e-6)
    finally:
        server.stop(grace=0)


# --------------------------------------------------------------------------- cost bounds


def _ranking(examples: Features, candidates: int, genres: np.ndarray | None = None) -> predict_pb2.PredictRequest:
    """One user (broadcast) and `candidates` movies, each with the given genres row(s)."""
    features: Features = {name: examples[name][:1] for name in USER_FEATURES}
    features["movie_id"] = np.arange(candidates, dtype=np.int64)
    features["genres"] = np.full((candidates, 1), "Drama", dtype=object) if genres is None else genres
    return request_of(features)


def _int_tensor(shape: tuple[int, ...]) -> Any:
    """An int64 tensor of zeros sent as tensor_content (cheap to build at any size)."""
    return _tensor(np.zeros(int(np.prod(shape)), np.int64), shape=list(shape))


def test_requests_beyond_the_cost_bounds_are_refused_before_the_work(stack: Stack, examples: Features) -> None:
    """Within the message limit a request could still cost seconds and GiB (genres of shape
    [65536, 64] took 4.6 s and 1.8 GiB); the bounds refuse it up front."""
    limits = stack.model.limits
    huge_genres = _ranking(examples, 65536)
    huge_genres.inputs["genres"].CopyFrom(_int_tensor((65536, 64)))
    too_many_together = _ranking(examples, 8192)
    too_many_together.inputs["genres"].CopyFrom(_int_tensor((8192, limits.max_elements // 8192)))
    broadcast = _ranking(examples, 8)
    broadcast.inputs["genres"].CopyFrom(_int_tensor((1, limits.max_elements // 8)))
    long_strings = _ranking(examples, 2)
    long_strings.inputs["zip"].CopyFrom(tf.make_tensor_proto(["9" * (limits.max_string_bytes // 2 + 1)] * 2))
    cases = {
        "one tensor": (huge_genres, "input 'genres': 4194304 elements; at most 262144 are accepted"),
        "the batch": (_ranking(examples, limits.max_batch + 1), "batch of 8193 examples; at most 8192 per request"),
        "all tensors": (too_many_together, "the inputs hold 270342 elements together; at most 262144 are accepted"),
        "after broadcasting": (broadcast, "the inputs hold 262192 elements over a batch of 8 (after broadcasting)"),
        "string bytes": (long_strings, "bytes of strings together; at most 8388608 are accepted"),
    }

    for what, (request, message) in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            stack.stub.Predict(request, timeout=TIMEOUT)
        assert info.value.code() == CODE.INVALID_ARGUMENT, (what, info.value.details())
        assert message in info.value.details(), what
    assert_serves_correctly(stack, examples)


def test_a_request_at_the_cost_bounds_is_served(stack: Stack, examples: Features) -> None:
    limits = stack.model.limits
    width = limits.max_elements // limits.max_batch - 6  # six single-valued features
    genres = np.full((limits.max_batch, width), "", dtype=object)
    genres[:, 0] = "Drama"
    request = _ranking(examples, limits.max_batch, genres)

    scores = scores_of(stack.stub, request)

    assert scores.shape == (limits.max_batch,) and np.isfinite(scores).all()


class _PassesAt:
    """A deadline that passes at its n-th check, recording the stages it was asked about."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.stages: list[str] = []

    def check(self, stage: str) -> None:
        self.stages.append(stage)
        if len(self.stages) >= self.n:
            raise DeadlineExceeded(f"deadline passed {stage}")

    def remaining(self) -> float | None:
        return None


class _CountingSparse:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lookups = 0
        self.timeouts: list[float | None] = []

    def lookup(self, *args: Any, **kwargs: Any) -> Any:
        self.lookups += 1
        self.timeouts.append(kwargs.get("timeout"))
        return self.inner.lookup(*args, **kwargs)


@pytest.mark.parametrize(("passes_at", "stage", "lookups"), [
    (1, "before parsing the features", 0),
    (2, "before the embedding lookup", 0),
    (3, "before the dense tower", 1),
])  # fmt: skip
def test_work_stops_between_stages_once_the_deadline_has_passed(
    stack: Stack, examples: Features, passes_at: int, stage: str, lookups: int
) -> None:
    """Three oversized Predicts at once used to keep running long past their deadline."""
    sparse = _CountingSparse(stack.model._sparse)
    model = ServingModel(stack.config, sparse, DensePSClient(stack.dense_server.address, timeout=TIMEOUT))
    assert model.refresh_dense()
    deadline = _PassesAt(passes_at)

    with pytest.raises(DeadlineExceeded, match=stage):
        model.predict(examples, deadline)  # type: ignore[arg-type]

    assert deadline.stages[-1] == stage and sparse.lookups == lookups
    np.testing.assert_allclose(model.predict(examples, Deadline.after(TIMEOUT)), stack.model.predict(examples))


def test_the_shard_lookup_gives_up_when_the_client_does(stack: Stack, examples: Features) -> None:
    """The shards' calls were bounded only by --ps-timeout, however short the client's deadline."""
    sparse = _CountingSparse(stack.model._sparse)
    model = ServingModel(stack.config, sparse, DensePSClient(stack.dense_server.address, timeout=TIMEOUT))
    assert model.refresh_dense()

    model.predict(examples, Deadline.after(0.5))
    model.predict(examples)

    assert sparse.timeouts[0] is not None and 0 < sparse.timeouts[0] <= 0.5
    assert sparse.timeouts[1] is None  # no deadline: the client's own timeout applies


def test_a_predict_whose_deadline_passes_while_decoding_is_deadline_exceeded(stack: Stack, examples: Features) -> None:
    class Expired:
        def time_remaining(self) -> float:
            return 0.0

    servicer = PredictionServicer(stack.model, SignatureConfig())

    with pytest.raises(DeadlineExceeded, match="while decoding input"):
        servicer.Predict(request_of(examples), Expired())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the python client


def test_the_python_client_scores_like_a_plain_tf_serving_client(stack: Stack, examples: Features) -> None:
    user = {name: examples[name].tolist()[0] for name in USER_FEATURES}  # plain ints and strs
    movies = examples["movie_id"][:5].tolist()
    genres = [[g for g in row if g] for row in examples["genres"][:5].tolist()]
    plain = scores_of(stack.stub, request_of({
        **{name: examples[name][:1] for name in USER_FEATURES},
        "movie_id": examples["movie_id"][:5],
        "genres": examples["genres"][:5],
    }))  # fmt: skip

    with MonolithClient(stack.server.address) as client:
        scores = client.score(user, {"movie_id": movies, "genres": genres})
        names = client.input_names()

    assert scores.dtype == np.float32 and scores.shape == (5,)
    np.testing.assert_allclose(scores, plain, rtol=0, atol=1e-6)
    assert names == sorted({f.source for f in stack.config.features} | {"request_id", "event_time"})


def test_the_python_client_raises_predict_error_with_the_status(stack: Stack, examples: Features) -> None:
    user = {name: examples[name][0] for name in USER_FEATURES}

    with MonolithClient(stack.server.address, model_name="ranker") as client:
        with pytest.raises(PredictError) as info:
            client.score(user, {"movie_id": [1, 2], "genres": [["Drama"], ["Comedy"]]})
    assert info.value.code == CODE.NOT_FOUND
    assert "Latest(ranker)" in info.value.details and str(info.value).startswith("NOT_FOUND: ")

    with MonolithClient(stack.server.address) as client:
        with pytest.raises(PredictError) as info:
            client.score({**user, "colour": "red"}, {"movie_id": [1], "genres": [["Drama"]]})
    assert info.value.code == CODE.INVALID_ARGUMENT and "colour" in info.value.details


# --------------------------------------------------------------------------- freshness


def test_training_on_a_user_changes_their_served_scores_at_once(stack: Stack, examples: Features) -> None:
    user = {name: examples[name][5:6] for name in USER_FEATURES}
    candidates = {name: examples[name][10:18] for name in ("movie_id", "genres")}
    request = request_of({**user, **candidates})
    before = scores_of(stack.stub, request)
    version = stack.model.dense_version

    full = {**{name: np.repeat(user[name], 8) for name in USER_FEATURES}, **candidates}
    positives = _batch_of(full, labels=np.ones(8, np.float32))
    for _ in range(3):
        stack.worker.train(positives)

    # The serving model reads the training shards: new rows are served before any dense pull.
    at_once = scores_of(stack.stub, request)
    assert stack.model.dense_version == version
    assert np.all(at_once > before + 0.01), (before, at_once)  # trained towards label 1

    assert stack.model.refresh_dense()
    assert stack.model.dense_version > version
    after_pull = scores_of(stack.stub, request)
    assert np.all(after_pull != at_once)
    stack.worker.refresh_dense()
    np.testing.assert_allclose(after_pull, stack.worker.predict(positives), rtol=0, atol=1e-6)


def _batch_of(features: Features, labels: np.ndarray) -> Batch:
    n = len(labels)
    ids, splits = {}, {}
    for name, values in features.items():
        rows = [[v for v in row if v != ""] for row in values] if values.ndim == 2 else [[v] for v in values]
        ids[name] = feature_ids(name, np.array([v for row in rows for v in row], dtype=object))
        splits[name] = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
    return Batch(ids, splits, labels, np.full(n, int(time.time()), np.int64))


# --------------------------------------------------------------------------- a shard goes down


@dataclasses.dataclass
class Outage:
    """What a Predict call saw while shard 0 was stopped, and how serving came back."""

    code: CODE
    details: str
    seconds: float
    scores_after: np.ndarray | None  # None: Predict still failed 20 s after the restart
    recovery: str  # why it did not recover ("" if it did)


@pytest.fixture(scope="module")
def outage(stack: Stack, examples: Features) -> Iterator[Outage]:
    """Serving over two shards of its own: stops shard 0, calls Predict, restarts it on the same port."""
    cluster = start_cluster(num_shards=2, tables=stack.config.tables())
    model = serving_model(stack.config, cluster.addresses, stack.dense_server.address)
    server = serve(model)
    channel = grpc.insecure_channel(server.address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        scores_of(stub, request_of(examples))  # healthy first
        port = cluster.servers[0].port
        cluster.servers[0].stop(grace=0)

        started = time.monotonic()
        try:
            stub.Predict(request_of(examples), timeout=5.0)
            code, details = CODE.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        seconds = time.monotonic() - started

        shard = EmbeddingShard(ShardConfig(shard=0, num_shards=2, role="training", tables=stack.config.tables()))
        cluster.servers[0] = build_embedding_ps(shard, ServerConfig(host="127.0.0.1", port=port, metrics_port=None))
        cluster.servers[0].start()

        def answered() -> tuple[np.ndarray] | None:
            try:
                return (scores_of(stub, request_of(examples)),)  # a tuple: an array's truth value is ambiguous
            except grpc.RpcError:
                return None

        # Failing here would fail every test of the module, not only the one about recovery.
        try:
            (scores_after,) = wait_for(answered, "Predict to answer after the shard came back", timeout=20, interval=0.2)
            recovery = ""
        except AssertionError as exc:
            scores_after, recovery = None, str(exc)
        yield Outage(code, details, seconds, scores_after, recovery)
    finally:
        channel.close()
        server.stop(grace=0)
        cluster.stop()


def test_a_shard_down_fails_predict_quickly_and_serving_recovers(outage: Outage) -> None:
    assert outage.code != CODE.OK
    assert outage.seconds < 5.0  # not a hang until the client's deadline
    assert outage.scores_after is not None, outage.recovery
    assert outage.scores_after.shape == (32,)


def test_a_shard_down_is_unavailable_not_internal(outage: Outage) -> None:
    """While a shard is down Predict answers UNAVAILABLE naming the embedding-PS, not INTERNAL.

    A dependency outage is transient: UNAVAILABLE is retryable by gRPC retry policies and
    TF Serving clients. Regression: the embedding client's grpc.RpcError once escaped
    ServingModel.predict and the interceptor turned it into INTERNAL with the raw repr of
    the error, logging a traceback per call.
    """
    assert outage.code == CODE.UNAVAILABLE, (outage.code, outage.details)
    assert "embedding" in outage.details.lower()
