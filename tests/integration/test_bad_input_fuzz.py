"""Every RPC of the embedding-PS, the dense-PS and model-serving, fed bytes a client should not send.

Real servers on free ports in this process. Requests travel through generic calls with
identity serializers, so the bytes on the wire are exactly the test's: raw garbage,
byte-level mutations of valid requests, and structure-aware mutations (fields set to edge
values, unknown enum numbers, NaNs, lengths that do not match, names 100,000 characters
long, repeated or dropped entries). The generator is seeded and the number of cases is
fixed, so a failure replays.

Each answer must be a clear status (OK or one that tells the client what it did wrong),
never INTERNAL or UNKNOWN; what must not change does not (a serving shard under every
RPC, a training shard and the dense-PS under read-only RPCs); and every server still
answers and stops within its grace period afterwards.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import descriptor, message
from grpc_health.v1 import health_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from helpers.cluster import Cluster, start_cluster
from monolith.api.dense_ps.v1 import dense_ps_pb2 as dpb
from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as epb
from monolith.common.server import MonolithServer, ServerConfig
from monolith.dense_ps.client import DensePSClient
from monolith.dense_ps.service import build_dense_ps
from monolith.dense_ps.store import DenseStore
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import ModelConfig, default_config_path, model_config_from_dict
from monolith.model.dense_model import DenseModel
from monolith.serving.model import ServingModel
from monolith.serving.service import build_serving
from monolith.serving.servicer import SignatureConfig

CODE = grpc.StatusCode
# Statuses that tell a client what is wrong with its request (or that it was served).
CLEAR = {
    CODE.OK,
    CODE.INVALID_ARGUMENT,
    CODE.FAILED_PRECONDITION,
    CODE.RESOURCE_EXHAUSTED,
    CODE.NOT_FOUND,
    CODE.OUT_OF_RANGE,
    CODE.DEADLINE_EXCEEDED,
    CODE.ALREADY_EXISTS,
    CODE.UNIMPLEMENTED,
}
TIMEOUT = 10.0
SEED = 20261129
EMBEDDING = "/monolith.api.embedding_ps.v1.EmbeddingPS/"
DENSE = "/monolith.api.dense_ps.v1.DensePS/"
PREDICTION = "/tensorflow.serving.PredictionService/"
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


@dataclasses.dataclass(frozen=True)
class Method:
    """One RPC: its path, request type, and whether either side streams."""

    path: str
    request: type[message.Message]
    request_stream: bool = False
    response_stream: bool = False


EMBEDDING_METHODS = {
    "Lookup": Method(EMBEDDING + "Lookup", epb.LookupRequest),
    "ApplyGradients": Method(EMBEDDING + "ApplyGradients", epb.ApplyGradientsRequest),
    "Export": Method(EMBEDDING + "Export", epb.ExportRequest, response_stream=True),
    "Import": Method(EMBEDDING + "Import", epb.RowChunk, request_stream=True),
    "Stats": Method(EMBEDDING + "Stats", epb.StatsRequest),
}
DENSE_METHODS = {
    "Init": Method(DENSE + "Init", dpb.InitRequest),
    "Pull": Method(DENSE + "Pull", dpb.PullRequest),
    "Push": Method(DENSE + "Push", dpb.PushRequest),
    "Stats": Method(DENSE + "Stats", dpb.StatsRequest),
}
PREDICTION_METHODS = {
    "Predict": Method(PREDICTION + "Predict", predict_pb2.PredictRequest),
    "GetModelMetadata": Method(PREDICTION + "GetModelMetadata", get_model_metadata_pb2.GetModelMetadataRequest),
    "Classify": Method(PREDICTION + "Classify", classification_pb2.ClassificationRequest),
    "Regress": Method(PREDICTION + "Regress", regression_pb2.RegressionRequest),
    "MultiInference": Method(PREDICTION + "MultiInference", inference_pb2.MultiInferenceRequest),
}
HEALTH_CHECK = Method("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest)


def call(channel: grpc.Channel, method: Method, payload: bytes | list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Sends raw request bytes (a list of them for a request stream); returns the final status."""
    try:
        if method.request_stream:
            chunks = payload if isinstance(payload, list) else [payload]
            channel.stream_unary(method.path)(iter(chunks), timeout=TIMEOUT)
        elif method.response_stream:
            for _ in channel.unary_stream(method.path)(payload, timeout=TIMEOUT):
                pass
        else:
            channel.unary_unary(method.path)(payload, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return CODE.OK, ""


# ------------------------------------------------------------------ the mutator

_INT32 = (0, 1, -1, 2, 7, 2**31 - 1, -(2**31))
_INT64 = (*_INT32, 2**32, 2**40, 2**62, 2**63 - 1, -(2**63))
_UINT32 = (0, 1, 2, 7, 2**32 - 1)
_UINT64 = (*_UINT32, 2**40, 2**63, 2**64 - 1)
_FLOATS = (0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e38, -1e-38)
_INTS_BY_TYPE = {
    descriptor.FieldDescriptor.CPPTYPE_INT32: _INT32,
    descriptor.FieldDescriptor.CPPTYPE_INT64: _INT64,
    descriptor.FieldDescriptor.CPPTYPE_UINT32: _UINT32,
    descriptor.FieldDescriptor.CPPTYPE_UINT64: _UINT64,
}


class Mutator:
    """Seeded mutations of protobuf messages, guided by their descriptors."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def string(self, current: str = "") -> str:
        choice = self.rng.randrange(6)
        if choice == 0:
            return ""
        if choice == 1:
            return "x" * self.rng.choice((1000, 100_000))
        if choice == 2:
            return "ünï\u2603\x00\x1f" + current
        if choice == 3 and current:
            return current[:-1] + chr(self.rng.randrange(32, 0x2FFF))
        return "".join(chr(self.rng.randrange(32, 127)) for _ in range(self.rng.randrange(1, 12)))

    def bytes_(self, current: bytes = b"") -> bytes:
        choice = self.rng.randrange(6)
        if choice == 0:
            return b""
        if choice == 1 and current:
            return current[: self.rng.randrange(len(current))]
        if choice == 2:
            return current + self.rng.randbytes(self.rng.choice((1, 4, 8, 13)))
        if choice == 3 and current:  # same length, other content: NaNs, ids of other shards, bad UTF-8
            return self.rng.randbytes(len(current))
        if choice == 4 and current:  # the same values, NaN where one was
            return current[:-4] + b"\x00\x00\xc0\x7f"
        return self.rng.randbytes(self.rng.randrange(0, 64))

    def scalar(self, field: descriptor.FieldDescriptor, current: Any = None) -> Any:
        kind = field.cpp_type
        if kind in _INTS_BY_TYPE:
            edges = _INTS_BY_TYPE[kind]
            if current and self.rng.random() < 0.3:
                return min(max(current + self.rng.choice((-1, 1)), min(edges)), max(edges))
            return self.rng.choice(edges)
        if kind in (descriptor.FieldDescriptor.CPPTYPE_FLOAT, descriptor.FieldDescriptor.CPPTYPE_DOUBLE):
            return self.rng.choice(_FLOATS)
        if kind == descriptor.FieldDescriptor.CPPTYPE_BOOL:
            return not current
        if kind == descriptor.FieldDescriptor.CPPTYPE_ENUM:
            known = [v.number for v in field.enum_type.values]
            return self.rng.choice((*known, max(known) + 1, 999, -1, 2**31 - 1))
        if field.type == descriptor.FieldDescriptor.TYPE_BYTES:
            return self.bytes_(current or b"")
        return self.string(current or "")

    def mutate(self, msg: message.Message, depth: int = 0) -> message.Message:
        """A mutated copy: one to three fields changed, nested messages included."""
        out = type(msg)()
        out.CopyFrom(msg)
        if not out.DESCRIPTOR.fields:  # e.g. StatsRequest: only byte-level mutations apply
            return out
        for _ in range(self.rng.randint(1, 3)):
            self._mutate_field(out, self.rng.choice(out.DESCRIPTOR.fields), depth)
        return out

    def _mutate_field(self, msg: message.Message, field: descriptor.FieldDescriptor, depth: int) -> None:
        name = field.name
        is_message = field.cpp_type == descriptor.FieldDescriptor.CPPTYPE_MESSAGE
        if field.is_repeated:
            values = getattr(msg, name)
            if is_message and field.message_type.GetOptions().map_entry:
                self._mutate_map(values, field.message_type, depth)
                return
            choice = self.rng.randrange(4)
            if choice == 0 and len(values):
                del values[self.rng.randrange(len(values))]
            elif choice == 1 and len(values):  # the same entry twice
                twin = values[self.rng.randrange(len(values))]
                if is_message:
                    values.add().CopyFrom(twin)
                else:
                    values.append(twin)
            elif is_message:
                if len(values) and depth < 3:
                    i = self.rng.randrange(len(values))
                    values[i].CopyFrom(self.mutate(values[i], depth + 1))
                else:
                    values.add()
            else:
                values.append(self.scalar(field))
            return
        if is_message:
            if depth < 3 and self.rng.random() < 0.8:
                getattr(msg, name).CopyFrom(self.mutate(getattr(msg, name), depth + 1))
            else:
                msg.ClearField(name)
            return
        setattr(msg, name, self.scalar(field, getattr(msg, name)))

    def _mutate_map(self, entries: Any, entry_type: descriptor.Descriptor, depth: int) -> None:
        keys = list(entries)
        value_field = entry_type.fields_by_name["value"]
        choice = self.rng.randrange(3)
        if choice == 0 and keys:
            del entries[self.rng.choice(keys)]
            return
        key = self.rng.choice(keys) if keys and choice == 1 else self.string()
        if value_field.cpp_type == descriptor.FieldDescriptor.CPPTYPE_MESSAGE:
            mutated = self.mutate(entries[key], depth + 1) if depth < 3 else type(entries[key])()
            entries[key].CopyFrom(mutated)
        else:
            entries[key] = self.scalar(value_field)

    def wire(self, data: bytes) -> bytes:
        """A byte-level mutation of a serialized message (it may or may not still parse)."""
        choice = self.rng.randrange(4)
        if choice == 0 and data:
            return data[: self.rng.randrange(len(data))]
        if choice == 1 and data:
            i = self.rng.randrange(len(data))
            return data[:i] + bytes([self.rng.randrange(256)]) + data[i + 1 :]
        if choice == 2:
            i = self.rng.randrange(len(data) + 1)
            return data[:i] + self.rng.randbytes(self.rng.randrange(1, 9)) + data[i:]
        return data + data  # a message merged with itself: repeated fields doubled

    def payload(self, seed_message: message.Message) -> bytes:
        """One case: raw garbage, a byte-level mutation, or a structure-aware one."""
        roll = self.rng.random()
        if roll < 0.15:
            return self.rng.randbytes(self.rng.randrange(0, 200))
        if roll < 0.4:
            return self.wire(seed_message.SerializeToString())
        return self.mutate(seed_message).SerializeToString()


def fuzz(
    channel: grpc.Channel,
    method: Method,
    seeds: list[message.Message],
    mutator: Mutator,
    cases: int,
    fix: Callable[[bytes], bytes] = lambda b: b,
) -> dict[grpc.StatusCode, int]:
    """Sends `cases` mutated requests; fails on the first unclear status. Returns codes seen."""
    seen: dict[grpc.StatusCode, int] = {}
    for i in range(cases):
        if method.request_stream:
            payload: bytes | list[bytes] = [
                fix(mutator.payload(mutator.rng.choice(seeds))) for _ in range(mutator.rng.randint(1, 3))
            ]
        else:
            payload = fix(mutator.payload(mutator.rng.choice(seeds)))
        code, details = call(channel, method, payload)
        assert code in CLEAR, f"{method.path} case {i}: {code.name}: {details[:500]!r} for {payload!r:.300}"
        assert len(details) <= 1024, f"{method.path} case {i}: a status message of {len(details)} characters"
        seen[code] = seen.get(code, 0) + 1
    return seen


# ------------------------------------------------------------------ the servers


def _ids(values: list[int]) -> bytes:
    return np.asarray(values, "<i8").tobytes()


def embedding_seeds() -> dict[str, list[message.Message]]:
    """Valid requests for the conftest tables (user, item: dim 8; tag: dim 4)."""
    ids = [1, 2, 3, 4]
    return {
        "Lookup": [
            epb.LookupRequest(tables=[epb.TableIds(table="item", num_ids=4, ids=_ids(ids))], mode=epb.LOOKUP_MODE_SERVING),
            epb.LookupRequest(
                tables=[
                    epb.TableIds(table="user", num_ids=2, ids=_ids(ids[:2]), counts=np.array([1, 2], "<i4").tobytes()),
                    epb.TableIds(table="tag", num_ids=1, ids=_ids([9])),
                ],
                mode=epb.LOOKUP_MODE_SERVING,
            ),
        ],
        "ApplyGradients": [
            epb.ApplyGradientsRequest(
                tables=[epb.TableGradients(table="item", num_ids=2, ids=_ids(ids[:2]), dim=8,
                                         gradients=np.full((2, 8), 0.5, "<f4").tobytes())],
                update_time=1_700_000_000,
            )  # fmt: skip
        ],
        "Export": [
            epb.ExportRequest(since_version=0, include_optimizer_state=True, max_rows_per_chunk=50),
            epb.ExportRequest(since_version=1, max_rows_per_chunk=3, tables=["item", "tag"]),
        ],
        "Import": [
            epb.RowChunk(table="item", num_rows=2, width=8, ids=_ids(ids[:2]), values=np.ones((2, 8), "<f4").tobytes(),
                         update_times=np.full(2, 1_700_000_000, "<u4").tobytes(), num_deleted=1,
                         deleted_ids=_ids([3]))  # fmt: skip
        ],
        "Stats": [epb.StatsRequest()],
    }


def dense_seeds(params: dict[str, np.ndarray]) -> dict[str, list[message.Message]]:
    tensors = [dpb.Tensor(name=n, shape=v.shape, values=v.astype("<f4").tobytes()) for n, v in params.items()]
    return {
        "Init": [dpb.InitRequest(tensors=tensors)],
        "Pull": [dpb.PullRequest(), dpb.PullRequest(names=list(params)[:2], if_newer_than=1)],
        "Push": [dpb.PushRequest(gradients=tensors[:2])],
        "Stats": [dpb.StatsRequest()],
    }


def prediction_seeds() -> dict[str, list[message.Message]]:
    features: dict[str, Any] = {
        "user_id": np.array([196], np.int64),
        "age": np.array(["45-49"], dtype=object),
        "gender": np.array(["M"], dtype=object),
        "occupation": np.array(["writer"], dtype=object),
        "zip": np.array(["554"], dtype=object),
        "movie_id": np.array([242, 302, 7], np.int64),
        "genres": np.array([["Comedy", ""], ["Crime", "Thriller"], ["Drama", ""]], dtype=object),
    }
    predict = predict_pb2.PredictRequest()
    predict.model_spec.name = "monolith"
    for name, values in features.items():
        predict.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    predict.inputs["request_id"].CopyFrom(tf.make_tensor_proto(["r-1"]))
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "monolith"
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "monolith"
    return {
        "Predict": [predict],
        "GetModelMetadata": [metadata],
        "Classify": [classify],
        "Regress": [regression_pb2.RegressionRequest()],
        "MultiInference": [inference_pb2.MultiInferenceRequest()],
    }


def model_config() -> ModelConfig:
    with open(default_config_path(), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["model"]["hidden_units"] = [8]
    return model_config_from_dict(raw)


@dataclasses.dataclass
class Servers:
    """One of each server, started in this process, and raw channels to them."""

    serving_shard: Cluster  # an embedding-PS shard of role serving, with rows
    serving_tables: Cluster  # the serving shard model-serving reads
    dense: MonolithServer
    dense_store: DenseStore
    prediction: MonolithServer
    channels: dict[str, grpc.Channel]


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    config = model_config()
    serving_shard = start_cluster(num_shards=1, role="serving")
    source = start_cluster(num_shards=1)
    source.client.lookup({"item": np.arange(40), "tag": np.arange(40)}, training=True)
    for chunk in source.shards[0].export(0, include_state=False):
        serving_shard.shards[0].apply_synced_chunk(chunk.table, chunk.rows, chunk.deleted_ids)
    source.stop()
    serving_tables = start_cluster(num_shards=1, role="serving", tables=config.tables())
    store = DenseStore(config.model.optimizer)
    store.init(DenseModel(config).initial_parameters(seed=1))
    dense = build_dense_ps(store, ServerConfig(port=0, metrics_port=None))
    dense.start()
    sparse = ShardedEmbeddingClient(serving_tables.addresses, config.table_dims(), timeout=TIMEOUT)
    model = ServingModel(config, sparse, DensePSClient(dense.address, timeout=TIMEOUT))
    assert model.refresh_dense()
    prediction = build_serving(model, SignatureConfig(), ServerConfig(port=0, metrics_port=None))
    prediction.start()
    addresses = {"serving shard": serving_shard.addresses[0], "dense": dense.address, "prediction": prediction.address}
    channels = {name: grpc.insecure_channel(address, options=UNLIMITED) for name, address in addresses.items()}
    yield Servers(serving_shard, serving_tables, dense, store, prediction, channels)
    for channel in channels.values():
        channel.close()
    prediction.stop(grace=0)
    sparse.close()
    dense.stop(grace=0)
    serving_tables.stop()
    serving_shard.stop()


ALL_METHODS = [
    *(("serving shard", m) for m in EMBEDDING_METHODS.values()),
    *(("dense", m) for m in DENSE_METHODS.values()),
    *(("prediction", m) for m in PREDICTION_METHODS.values()),
    *((server, HEALTH_CHECK) for server in ("serving shard", "dense", "prediction")),
]


# ------------------------------------------------------------------ fixed cases


@pytest.mark.parametrize(("server", "method"), ALL_METHODS, ids=[f"{s}:{m.path}" for s, m in ALL_METHODS])
def test_bytes_that_do_not_parse_are_invalid_argument_on_every_method(
    servers: Servers, server: str, method: Method
) -> None:
    """Not INTERNAL "Exception deserializing request!": garbage is the client's error."""
    code, details = call(servers.channels[server], method, b"\xff\xff\xff")

    assert code == CODE.INVALID_ARGUMENT, details
    assert f"request bytes do not parse as {method.request.DESCRIPTOR.full_name}" in details


def test_a_server_stops_within_its_grace_period_after_an_import_that_does_not_parse(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Regression: gRPC answered the bad message itself, then sent a second status when the
    Import handler returned; that send never completed, so `stop()` waited forever (about
    one try in three)."""
    for _ in range(6):
        cluster = make_cluster(num_shards=1, metrics=True)
        with grpc.insecure_channel(cluster.addresses[0]) as channel:
            good = embedding_seeds()["Import"][0].SerializeToString()
            code, _ = call(channel, EMBEDDING_METHODS["Import"], [good, b"\xff\xff\xff"])
        assert code == CODE.INVALID_ARGUMENT

        started = time.monotonic()
        assert cluster.servers[0].stop(grace=1.0), "gRPC still had the call open after the grace period"
        assert time.monotonic() - started < 1.0 + 1.0


# ------------------------------------------------------------------ fuzzing


def test_fuzzing_a_serving_shard_gets_clear_answers_and_changes_nothing(servers: Servers) -> None:
    """Every RPC, Import and ApplyGradients included: a serving shard changes only by its own sync."""
    shard = servers.serving_shard
    before = shard.snapshot()
    mutator = Mutator(SEED)
    seeds = embedding_seeds()
    seen = {}
    for name, method in EMBEDDING_METHODS.items():
        seen[name] = fuzz(servers.channels["serving shard"], method, seeds[name], mutator, cases=40)

    assert shard.snapshot() == before
    assert seen["Stats"].get(CODE.OK, 0) > 0 and seen["Lookup"].get(CODE.OK, 0) > 0  # the fuzz reached the shard


def _serving_lookups_only(data: bytes) -> bytes:
    """A Lookup that parses as a training lookup is sent as a serving one (reads only)."""
    try:
        request = epb.LookupRequest.FromString(data)
    except message.DecodeError:
        return data
    if request.mode == epb.LOOKUP_MODE_TRAINING:
        request.mode = epb.LOOKUP_MODE_SERVING
        return request.SerializeToString()
    return data


def test_fuzzing_the_read_only_rpcs_of_a_training_shard_changes_nothing(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(num_shards=2)
    cluster.client.lookup({"user": np.repeat(np.arange(30), 2), "item": np.arange(30), "tag": np.arange(30)},
                          training=True)  # fmt: skip
    before = cluster.snapshot()
    mutator = Mutator(SEED + 1)
    seeds = embedding_seeds()
    with grpc.insecure_channel(cluster.addresses[0], options=UNLIMITED) as channel:
        for name in ("Lookup", "Export", "Stats"):
            fix = _serving_lookups_only if name == "Lookup" else (lambda b: b)
            fuzz(channel, EMBEDDING_METHODS[name], seeds[name], mutator, cases=40, fix=fix)

    assert cluster.snapshot() == before
    assert all(server.stop(grace=1.0) for server in cluster.servers)


def test_fuzzing_the_writes_of_a_training_shard_gets_clear_answers(make_cluster: Callable[..., Cluster]) -> None:
    """Writes may legitimately change the tables; the answers must still be clear, and the shard sound."""
    cluster = make_cluster(num_shards=1)
    mutator = Mutator(SEED + 2)
    seeds = embedding_seeds()
    with grpc.insecure_channel(cluster.addresses[0], options=UNLIMITED) as channel:
        for name in ("ApplyGradients", "Import"):
            fuzz(channel, EMBEDDING_METHODS[name], seeds[name], mutator, cases=30)
        training = epb.LookupRequest()
        training.CopyFrom(seeds["Lookup"][1])
        training.mode = epb.LOOKUP_MODE_TRAINING
        fuzz(channel, EMBEDDING_METHODS["Lookup"], [training], mutator, cases=30)

    rows = cluster.rows(0)  # the tables still export, with finite values only
    assert all(np.isfinite(values).all() for table in rows.values() for values, _ in table.values())
    assert cluster.servers[0].stop(grace=1.0)


def test_fuzzing_the_dense_ps_gets_clear_answers_and_reads_change_nothing(servers: Servers) -> None:
    store = servers.dense_store
    before = store.snapshot()
    mutator = Mutator(SEED + 3)
    seeds = dense_seeds(before.tensors)
    channel = servers.channels["dense"]
    for name in ("Init", "Pull", "Stats"):  # Init of an initialized store only answers
        fuzz(channel, DENSE_METHODS[name], seeds[name], mutator, cases=40)
    after = store.snapshot()
    assert after.version == before.version
    for name, value in before.tensors.items():
        np.testing.assert_array_equal(after.tensors[name], value)

    pushes = fuzz(channel, DENSE_METHODS["Push"], seeds["Push"], mutator, cases=40)
    assert store.version == before.version + pushes.get(CODE.OK, 0)
    assert all(np.isfinite(t).all() for t in store.snapshot().tensors.values())


def test_fuzzing_model_serving_gets_clear_answers_and_changes_no_table(servers: Servers) -> None:
    tables = servers.serving_tables
    before = tables.snapshot()
    mutator = Mutator(SEED + 4)
    seeds = prediction_seeds()
    seen = {}
    for name, method in PREDICTION_METHODS.items():
        cases = 80 if name == "Predict" else 15
        seen[name] = fuzz(servers.channels["prediction"], method, seeds[name], mutator, cases=cases)

    assert tables.snapshot() == before
    assert seen["Predict"].get(CODE.OK, 0) > 0  # some mutations still score
    assert call(servers.channels["prediction"], PREDICTION_METHODS["Predict"], seeds["Predict"][0].SerializeToString())[0] == CODE.OK
