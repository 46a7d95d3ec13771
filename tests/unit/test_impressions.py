"""Impressions built from a Predict call, checked without NATS.

Requests go through the same steps as in the servicer (TensorProtos decoded, the
request_id and event_time inputs taken out, the features parsed), so the text values an
impression carries can be compared with the ids serving computed from the same call.
"""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from helpers.models import small_config
from monolith.api.joiner.v1 import joiner_pb2
from monolith.common.errors import InvalidArgument
from monolith.data.feature_ids import feature_ids
from monolith.model.config import ModelConfig
from monolith.serving.impressions import (
    EVENT_TIME,
    REQUEST_ID,
    ImpressionLog,
    RequestKeys,
    ScoredRequest,
    feature_texts,
    impression_messages,
    request_keys,
)
from monolith.serving.limits import RequestLimits
from monolith.serving.metrics import IMPRESSIONS_DROPPED
from monolith.serving.model import ServingModel
from monolith.serving.tensors import decode_inputs
from monolith.streams.config import StreamsConfig, events_subject, partition_of
from monolith.streams.events import expand_impressions
from monolith.streams.ids import impressions_message_id
from monolith.trainer.backends import LocalDense, LocalEmbeddings

USER = {"user_id": [196], "age": [49], "gender": ["M"], "occupation": ["writer"], "zip": ["55105"]}
CANDIDATES = {
    "movie_id": [242, 302, 377],
    "genres": [["Comedy", "", ""], ["Crime", "Film-Noir", "Thriller"], ["Children's", "Comedy", ""]],
}


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return small_config()


@pytest.fixture(scope="module")
def model(config: ModelConfig) -> ServingModel:
    """Only `parse` is used: hashing needs no trained tables."""
    return ServingModel(config, LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer))


class Parsed:
    """A call taken apart the way the servicer does it."""

    def __init__(self, model: ServingModel, tensors: dict[str, Any]) -> None:
        protos = {name: tf.make_tensor_proto(value) for name, value in tensors.items()}
        self.inputs = decode_inputs(protos, RequestLimits(), numeric=(EVENT_TIME,))
        request_id, event_time = self.inputs.pop(REQUEST_ID, None), self.inputs.pop(EVENT_TIME, None)
        self.ids, self.row_splits, self.batch = model.parse(self.inputs)
        item = model.config.item_feature
        assert item is not None
        self.keys = request_keys(request_id, event_time, (item, self.inputs[item]), self.batch)

    def scored(self, version: int = 7, received_at: float = 1_000.0) -> ScoredRequest:
        assert self.keys is not None
        scores = np.linspace(0.1, 0.9, self.batch).astype(np.float32)
        return ScoredRequest(self.keys, self.inputs, scores, version, received_at)

    def example_ids(self, name: str, i: int) -> np.ndarray:
        return self.ids[name][self.row_splits[name][i] : self.row_splits[name][i + 1]]


def ranking_call(**extra: Any) -> dict[str, Any]:
    return {**USER, **CANDIDATES, **extra}


def impressions_of(scored: ScoredRequest) -> list[joiner_pb2.Impression]:
    """The impressions the messages carry, each candidate's shared and own features merged."""
    events = [joiner_pb2.Event.FromString(m.message.payload) for m in impression_messages(scored, 8)]
    assert all(e.WhichOneof("event") == "impressions" for e in events)
    return [i for e in events for i in expand_impressions(e.impressions)]


# --------------------------------------------------------------------------- building


def test_one_impression_per_candidate_with_the_request_id_broadcast(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id=["r-1"], event_time=np.array([1_700_000_000.5])))

    impressions = impressions_of(call.scored(version=7))

    assert [i.request_id for i in impressions] == ["r-1"] * 3
    assert [i.item_id for i in impressions] == ["242", "302", "377"]
    assert [i.event_time for i in impressions] == [1_700_000_000.5] * 3
    assert [i.model_version for i in impressions] == [7] * 3
    np.testing.assert_allclose([i.score for i in impressions], np.linspace(0.1, 0.9, 3), rtol=1e-6)
    assert list(impressions[1].features["genres"].values) == ["Crime", "Film-Noir", "Thriller"]
    assert list(impressions[0].features["genres"].values) == ["Comedy"]  # "" pads, it is no value
    assert list(impressions[2].features["user_id"].values) == ["196"]


def test_the_text_values_hash_to_the_ids_serving_computed(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id=["r-1"]))

    impressions = impressions_of(call.scored())

    for i, impression in enumerate(impressions):
        assert set(impression.features) == set(model.input_names)
        for name, values in impression.features.items():
            np.testing.assert_array_equal(feature_ids(name, list(values.values)), call.example_ids(name, i), name)


def test_strings_sent_for_int_features_give_the_same_text(model: ServingModel) -> None:
    as_ints = Parsed(model, ranking_call(request_id=["r"]))
    as_strings = Parsed(model, ranking_call(request_id=["r"], user_id=["196"], movie_id=["242", "302", "377"]))

    assert impressions_of(as_ints.scored()) == impressions_of(as_strings.scored())


def test_one_request_id_per_example_and_one_event_time_per_example(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id=["a", "b", "c"], event_time=np.array([10, 20, 30], np.int64)))

    impressions = impressions_of(call.scored())

    assert [(i.request_id, i.event_time) for i in impressions] == [("a", 10.0), ("b", 20.0), ("c", 30.0)]


def test_a_scalar_request_id_and_event_time_cover_the_call(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id="r-9", event_time=np.float32(1024.0)))

    impressions = impressions_of(call.scored())

    assert [(i.request_id, i.event_time) for i in impressions] == [("r-9", 1024.0)] * 3


def test_without_event_time_the_serving_clock_stamps_the_impressions(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id=["r"]))

    impressions = impressions_of(call.scored(received_at=1234.5))

    assert {i.event_time for i in impressions} == {1234.5}


def test_an_int_request_id_is_its_decimal_text(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id=np.array([77], np.int64)))

    assert {i.request_id for i in impressions_of(call.scored())} == {"77"}


def test_examples_without_a_request_id_or_item_are_left_out(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id=["a", "", "c"], movie_id=["242", "302", ""]))

    impressions = impressions_of(call.scored())

    assert [(i.request_id, i.item_id) for i in impressions] == [("a", "242")]


def test_a_call_without_request_id_has_no_keys(model: ServingModel) -> None:
    assert Parsed(model, ranking_call(event_time=[5.0])).keys is None


def test_feature_texts_follow_the_hashing_rules() -> None:
    assert feature_texts(np.array([7, -8], np.int64)) == [["7"], ["-8"]]
    assert feature_texts(np.array([b"Z\xc3\xbcrich", b"x"])) == [["Zürich"], ["x"]]
    assert feature_texts(np.array([["a", ""], ["", ""]], dtype=object)) == [["a"], []]
    assert feature_texts(np.array([["a", ""]])) == [["a"]]  # numpy unicode pads like object arrays
    assert feature_texts(np.array([""], dtype=object)) == [[""]]  # one value, not padding
    assert feature_texts(np.array([[1, 2]], np.int64)) == [["1", "2"]]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("event_time", "expected"),
    [
        ([float("nan")], "example 0 has nan"),
        ([1.0, float("inf"), 2.0], "example 1 has inf"),
        ([-1.0], "example 0 has -1.0"),
        (np.array([3, -5, 4], np.int64), "example 1 has -5.0"),
    ],
    ids=["nan", "inf", "negative", "negative-int"],
)
def test_an_event_time_that_is_no_time_is_refused(model: ServingModel, event_time: Any, expected: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        Parsed(model, ranking_call(request_id=["r"], event_time=event_time))

    assert "input 'event_time'" in str(raised.value) and "finite and >= 0" in str(raised.value)
    assert expected in str(raised.value)


def test_a_bad_event_time_is_refused_without_a_request_id_too(model: ServingModel) -> None:
    with pytest.raises(InvalidArgument, match="input 'event_time'"):
        Parsed(model, ranking_call(event_time=[float("nan")]))


def test_an_event_time_given_as_text_is_refused(model: ServingModel) -> None:
    with pytest.raises(InvalidArgument, match=r"input 'event_time': expects a double, float or int64 tensor"):
        Parsed(model, ranking_call(event_time=["yesterday"]))


@pytest.mark.parametrize("name", [REQUEST_ID, EVENT_TIME])
@pytest.mark.parametrize("shape", [(2,), (3, 1), (1, 1)])
def test_shapes_other_than_scalar_one_or_batch_are_refused(
    model: ServingModel, name: str, shape: tuple[int, ...]
) -> None:
    value = np.full(shape, "r", dtype=object) if name == REQUEST_ID else np.full(shape, 5.0)

    with pytest.raises(InvalidArgument) as raised:
        Parsed(model, ranking_call(**{name: value}))

    assert f"input {name!r}: expects shape [] or [1]" in str(raised.value) and "[3]" in str(raised.value)


def test_request_keys_broadcast_to_the_batch() -> None:
    keys = request_keys(np.array("r", dtype=object), np.array([2.5]), ("movie_id", np.array([7, 8, 9, 10])), 4)

    assert isinstance(keys, RequestKeys)
    assert keys.request_ids.tolist() == ["r"] * 4
    assert keys.item_ids == ["7", "8", "9", "10"]
    assert keys.event_times is not None and keys.event_times.tolist() == [2.5] * 4


# --------------------------------------------------------------------------- messages


def test_each_message_goes_to_its_request_ids_partition_under_its_id(model: ServingModel) -> None:
    request_ids = ["req-1", "req-2", "req-3"]
    call = Parsed(model, ranking_call(request_id=request_ids))

    messages = [m.message for m in impression_messages(call.scored(), partitions=8)]

    assert [m.subject for m in messages] == [events_subject(partition_of(r, 8)) for r in request_ids]
    assert [m.msg_id for m in messages] == [
        impressions_message_id("req-1", ["242"]), impressions_message_id("req-2", ["302"]),
        impressions_message_id("req-3", ["377"]),
    ]  # fmt: skip


def test_a_call_is_one_message_with_the_shared_features_once(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id=["r-1"], event_time=np.array([99.5])))
    expected = joiner_pb2.Impressions(request_id="r-1", event_time=99.5, model_version=7)
    for name, values in USER.items():
        expected.shared_features[name].values.extend(str(v) for v in values)
    genres = [["Comedy"], ["Crime", "Film-Noir", "Thriller"], ["Children's", "Comedy"]]
    for movie, score, movie_genres in zip(["242", "302", "377"], [0.1, 0.5, 0.9], genres):
        candidate = expected.candidates.add(item_id=movie, score=score)
        candidate.features["movie_id"].values.append(movie)
        candidate.features["genres"].values.extend(movie_genres)

    (built,) = impression_messages(call.scored(version=7), partitions=8)

    assert built.candidates == 3
    assert built.message.msg_id == impressions_message_id("r-1", ["242", "302", "377"])
    assert joiner_pb2.Event.FromString(built.message.payload) == joiner_pb2.Event(impressions=expected)


def test_times_per_candidate_ride_on_the_candidates_that_differ(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id=["r-1"], event_time=np.array([5.0, 5.0, 7.5])))

    (built,) = impression_messages(call.scored(), partitions=8)
    message = joiner_pb2.Event.FromString(built.message.payload).impressions

    assert message.event_time == 5.0
    assert [c.HasField("event_time") for c in message.candidates] == [False, False, True]
    assert [i.event_time for i in impressions_of(call.scored())] == [5.0, 5.0, 7.5]


def test_a_message_over_the_payload_bound_is_split_and_a_candidate_too_large_alone_left_out(
    model: ServingModel,
) -> None:
    call = Parsed(model, ranking_call(request_id=["r-1"]))
    (whole,) = impression_messages(call.scored(), partitions=8)

    just_too_small = len(whole.message.payload) + len(whole.message.msg_id) + 63  # 64 bytes for other headers
    split = impression_messages(call.scored(), partitions=8, max_bytes=just_too_small)
    none_fit = impression_messages(call.scored(), partitions=8, max_bytes=64)

    assert [m.candidates for m in split] == [1, 2]
    assert len({m.message.msg_id for m in split}) == 2  # each part is its own message
    merged = [c for m in split for c in joiner_pb2.Event.FromString(m.message.payload).impressions.candidates]
    assert merged == list(joiner_pb2.Event.FromString(whole.message.payload).impressions.candidates)
    assert none_fit == []


def test_message_ids_encode_each_id_so_that_no_two_keys_share_one(model: ServingModel) -> None:
    call = Parsed(model, ranking_call(request_id=["a/b", "a", "Zürich 1"], movie_id=["c", "b/c", "x%"]))

    ids = [m.message.msg_id for m in impression_messages(call.scored(), partitions=8)]

    assert [i.rsplit("/", 1)[0] for i in ids] == ["imps/a%2Fb", "imps/a", "imps/Z%C3%BCrich%201"]
    assert ids[0] != impressions_message_id("a/b", ["x"])  # the digest names the candidates


HOSTILE_IDS = {
    "crlf": ("r\r\nNats-Msg-Id: x", "control characters are not allowed (U+000D at character 1)"),
    "lf": ("r\nx", "control characters are not allowed (U+000A"),
    "nul": ("r\x00", "control characters are not allowed (U+0000"),
    "del": ("r\x7f", "control characters are not allowed (U+007F"),
    "c1": ("r\x85", "control characters are not allowed (U+0085"),
    "64KiB": ("r" * 65536, "65536 bytes; at most 256"),
    "257 bytes": ("é" * 128 + "r", "257 bytes; at most 256"),
}


@pytest.mark.parametrize(("value", "problem"), HOSTILE_IDS.values(), ids=HOSTILE_IDS.keys())
def test_a_request_id_that_breaks_the_id_rule_is_refused_naming_the_example(
    model: ServingModel, value: str, problem: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        Parsed(model, ranking_call(request_id=["ok", "fine", value]))

    assert str(raised.value).startswith("input 'request_id': example 2: ")
    assert problem in str(raised.value)
    assert len(str(raised.value)) < 400  # the value is echoed shortened


@pytest.mark.parametrize(("value", "problem"), HOSTILE_IDS.values(), ids=HOSTILE_IDS.keys())
def test_an_item_id_that_breaks_the_id_rule_is_refused_naming_the_example(
    model: ServingModel, value: str, problem: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        Parsed(model, ranking_call(request_id=["r"], movie_id=["242", value, "377"]))

    assert str(raised.value).startswith("input 'movie_id': example 1: ")
    assert problem in str(raised.value)


def test_ids_are_checked_only_where_an_impression_would_be_logged(model: ServingModel) -> None:
    hostile = "m\r\n"
    # No request_id: nothing is logged, the ids are features like any other.
    assert Parsed(model, ranking_call(movie_id=["242", hostile, "377"])).keys is None
    # An example without a request_id logs nothing either.
    call = Parsed(model, ranking_call(request_id=["a", "", "c"], movie_id=["242", hostile, "377"]))

    assert [(i.request_id, i.item_id) for i in impressions_of(call.scored())] == [("a", "242"), ("c", "377")]


def test_a_request_id_that_is_not_utf8_is_refused_naming_the_input(model: ServingModel) -> None:
    with pytest.raises(InvalidArgument, match=r"input 'request_id': string values must be UTF-8"):
        Parsed(model, ranking_call(request_id=np.array([b"ok", b"\xff\xfe", b"ok"], dtype=object)))
    with pytest.raises(InvalidArgument, match=r"input 'movie_id': string values must be UTF-8"):
        Parsed(model, ranking_call(request_id=["r"], movie_id=np.array([b"242", b"\xc3(", b"377"], dtype=object)))


# --------------------------------------------------------------------------- the bounded queue


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dropped(reason: str) -> float:
    return IMPRESSIONS_DROPPED.labels(reason)._value.get()


def test_with_nats_unreachable_the_queue_fills_then_drops_are_counted(model: ServingModel) -> None:
    streams = StreamsConfig(url=f"nats://127.0.0.1:{closed_port()}")
    log = ImpressionLog(streams, capacity=7).start()
    scored = Parsed(model, ranking_call(request_id=["r"])).scored()  # 3 impressions
    full_before, shutdown_before = dropped("queue_full"), dropped("shutdown")
    try:
        for _ in range(4):
            log.log(scored)  # never blocks: 3 + 3 fit, the next two calls do not

        assert log.queued == 6
        assert dropped("queue_full") - full_before == 6
    finally:
        log.close(timeout=0.1)

    assert dropped("shutdown") - shutdown_before == 6
    assert log.queued == 0
    log.log(scored)  # after close: counted, not queued
    assert dropped("shutdown") - shutdown_before == 9


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ImpressionLog(StreamsConfig(), capacity=0)
