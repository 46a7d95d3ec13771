"""model-serving logs impressions to a real nats-server, and keeps serving while it is down.

The model is in process on local tables a trainer stepped a few times (the impressions,
not the scores, are under test); Predict is the real gRPC server with an `ImpressionLog`;
NATS is the real nats-server binary on a free port, killed and restarted on the same port
and store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from helpers.models import small_config, trained_serving_model
from helpers.streams import MSG_ID_HEADER, logged_impressions, read_events
from helpers.waiting import wait_for
from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.common.server import MonolithServer, ServerConfig
from monolith.serving.impressions import ImpressionLog
from monolith.serving.metrics import IMPRESSIONS_DROPPED, IMPRESSIONS_PUBLISHED
from monolith.serving.model import ServingModel
from monolith.serving.service import build_serving
from monolith.serving.servicer import SignatureConfig
from monolith.streams.config import StreamsConfig, events_subject, partition_of
from monolith.streams.ids import impressions_message_id
from monolith.streams.nats_server import NatsServer

PARTITIONS = 4
TIMEOUT = 10.0
USER = {"user_id": [196], "age": [49], "gender": ["M"], "occupation": ["writer"], "zip": ["55105"]}
GENRES = ["Comedy", "Crime", "Drama", "Action", "Film-Noir", "Children's"]


def candidates(n: int, first: int = 1) -> dict[str, Any]:
    movies = list(range(first, first + n))
    genres = [[GENRES[m % 6], GENRES[(m + 1) % 6] if m % 2 else ""] for m in movies]
    return {"movie_id": np.array(movies, np.int64), "genres": np.array(genres, dtype=object)}


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return trained_serving_model(small_config(), examples=512)


class Serving:
    """Predict with impressions on, over a nats-server that tests may kill and restart."""

    def __init__(self, model: ServingModel, nats: NatsServer, capacity: int) -> None:
        self.nats = nats
        self.streams = StreamsConfig(url=nats.url, partitions=PARTITIONS, timeout=1.0)
        self.log = ImpressionLog(self.streams, capacity).start()
        self.server: MonolithServer = build_serving(
            model, SignatureConfig(), ServerConfig(host="127.0.0.1", port=0, metrics_port=None), self.log
        )
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def predict(self, features: dict[str, Any], timeout: float = TIMEOUT, **extra: Any) -> np.ndarray:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "monolith"
        for name, values in {**features, **extra}.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
        response = self.stub.Predict(request, timeout=timeout)
        return tf.make_ndarray(response.outputs["scores"])

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=0)
        self.log.close(timeout=2.0)


@pytest.fixture
def serve(model: ServingModel, tmp_path: Any) -> Iterator[Callable[..., Serving]]:
    started: list[Serving] = []

    def make(capacity: int = 10_000) -> Serving:
        nats = NatsServer(str(tmp_path / "nats"), log_path=str(tmp_path / "nats.log")).start()
        started.append(Serving(model, nats, capacity))
        return started[-1]

    yield make
    for serving in started:
        serving.close()
        serving.nats.stop()


def impressions_by_id(streams: StreamsConfig) -> dict[tuple[str, str], tuple[str, str, pb.Impression]]:
    out = {}
    for message, event in read_events(streams):
        assert event.WhichOneof("event") == "impressions"  # one message per call
        for impression in logged_impressions(event):
            key = (impression.request_id, impression.item_id)
            assert key not in out, f"impression {key} stored twice"
            out[key] = (message.subject, message.headers.get(MSG_ID_HEADER, ""), impression)
    return out


def counter(metric: Any) -> float:
    return metric._value.get()


# --------------------------------------------------------------------------- tests


def test_predict_with_a_request_id_publishes_one_impression_per_candidate(
    serve: Callable[..., Serving], model: ServingModel
) -> None:
    serving = serve()
    published_before = counter(IMPRESSIONS_PUBLISHED)
    calls = {f"req-{k}": candidates(5, first=100 * k + 1) for k in range(6)}  # several partitions
    scores = {
        request_id: serving.predict({**USER, **movies}, request_id=[request_id], event_time=np.array([880_000_000.25]))
        for request_id, movies in calls.items()
    }

    stored = wait_for(lambda: len(found := impressions_by_id(serving.streams)) == 30 and found, "30 impressions")

    for request_id, movies in calls.items():
        for i, movie in enumerate(movies["movie_id"].tolist()):
            subject, msg_id, impression = stored[(request_id, str(movie))]
            assert subject == events_subject(partition_of(request_id, PARTITIONS))
            assert msg_id == impressions_message_id(request_id, [str(m) for m in movies["movie_id"].tolist()])
            assert impression.event_time == 880_000_000.25
            assert impression.model_version == model.dense_version
            assert impression.score == pytest.approx(float(scores[request_id][i]), abs=1e-7)
            genres = [g for g in movies["genres"][i].tolist() if g]
            assert list(impression.features["genres"].values) == genres
            assert list(impression.features["user_id"].values) == ["196"]
            assert list(impression.features["gender"].values) == ["M"]
            assert list(impression.features["movie_id"].values) == [str(movie)]
    assert counter(IMPRESSIONS_PUBLISHED) - published_before == 30


def test_calls_without_a_request_id_log_nothing(serve: Callable[..., Serving]) -> None:
    serving = serve()
    serving.predict({**USER, **candidates(3)})
    serving.predict({**USER, **candidates(2, first=50)}, request_id=["marker"])

    stored = wait_for(lambda: impressions_by_id(serving.streams), "the marker's impressions")

    assert {request_id for request_id, _ in stored} == {"marker"} and len(stored) == 2


def test_predict_keeps_answering_while_nats_is_down_and_impressions_resume_after(
    serve: Callable[..., Serving],
) -> None:
    serving = serve(capacity=20)
    serving.predict({**USER, **candidates(4)}, request_id=["before"])
    wait_for(lambda: serving.log.queued == 0, "the first impressions to be published")
    full_before = counter(IMPRESSIONS_DROPPED.labels("queue_full"))

    serving.nats.kill()
    answered = []
    for k in range(10):  # 50 impressions for a queue of 20: the calls after the 4th find it full
        # A call that waited for NATS would pass its 3 s deadline (publishes time out after 1 s, retried).
        scores = serving.predict({**USER, **candidates(5, first=10 * k + 1)}, timeout=3.0, request_id=[f"down-{k}"])
        answered.append(scores.shape)

    assert answered == [(5,)] * 10
    assert counter(IMPRESSIONS_DROPPED.labels("queue_full")) - full_before == 30
    assert serving.log.queued == 20

    down = serving.nats
    serving.nats = NatsServer(down.data_dir, down.port, down.monitor_port, down.log_path).start()
    wait_for(lambda: serving.log.queued == 0, "the queued impressions to be published", timeout=60)
    serving.predict({**USER, **candidates(3)}, request_id=["after"])

    stored = wait_for(
        lambda: (found := impressions_by_id(serving.streams)) and ("after", "3") in found and found,
        "impressions of a call after NATS came back",
    )
    queued_calls = {f"down-{k}" for k in range(4)}
    assert {r for r, _ in stored} == {"before", "after"} | queued_calls
    assert len(stored) == 4 + 20 + 3  # each exactly once, re-sends de-duplicated by message id


def test_a_bad_event_time_is_invalid_argument(serve: Callable[..., Serving]) -> None:
    serving = serve()
    for event_time, detail in [
        (np.array([float("nan")]), "finite and >= 0"),
        (np.array([-5.0]), "finite and >= 0"),
        (np.array([1.0, 2.0]), "expects shape [] or [1]"),
        (["noon"], "expects a double, float or int64 tensor"),
    ]:
        with pytest.raises(grpc.RpcError) as raised:
            serving.predict({**USER, **candidates(3)}, request_id=["bad"], event_time=event_time)

        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'event_time'" in raised.value.details() and detail in raised.value.details()


HOSTILE_IDS = {
    "crlf": ("r\r\nNats-Msg-Id: x", "control characters are not allowed"),
    "lf": ("r\nx", "control characters are not allowed"),
    "nul": ("r\x00", "control characters are not allowed"),
    "64KiB": ("r" * 65536, "65536 bytes; at most 256"),
    "not-utf8": (b"r\xff\xfe", "string values must be UTF-8"),
}


@pytest.mark.parametrize("where", ["request_id", "movie_id"])
def test_ids_that_break_the_id_rule_are_invalid_argument_and_log_nothing(
    serve: Callable[..., Serving], where: str
) -> None:
    serving = serve()
    movies = candidates(3, first=40)
    for value, problem in HOSTILE_IDS.values():
        if where == "request_id":
            call = {**movies, "request_id": np.array(["ok", "ok", value], dtype=object)}
        else:
            call = {**movies, "request_id": ["ok"], "movie_id": np.array(["40", value, "42"], dtype=object)}
        with pytest.raises(grpc.RpcError) as raised:
            serving.predict({**USER, **call})

        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"input '{where}'" in raised.value.details() and problem in raised.value.details()
        assert len(raised.value.details()) < 600  # the value is echoed shortened
    # A call after them is logged; nothing of the refused calls was (the log is in call order).
    serving.predict({**USER, **candidates(2, first=50)}, request_id=["marker"])

    stored = wait_for(lambda: impressions_by_id(serving.streams), "the marker's impressions")

    assert sorted(stored) == [("marker", "50"), ("marker", "51")]
