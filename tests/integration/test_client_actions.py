"""The Python client's loop: score under a request_id, report an action, get a training sample.

Real parts in this process on free ports (helpers.client_stack): a nats-server, model-serving
logging impressions, and the sample-joiner (its ReportActions API and the join); the same over
TLS. The client is the shipped `monolith_client`, blocking and asyncio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from helpers.client_stack import PARTITIONS, ClientStack
from helpers.streams import MSG_ID_HEADER, logged_impressions, read_stream
from helpers.tls import HAVE_OPENSSL, self_signed
from helpers.waiting import wait_for
from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, events_subject, partition_of
from monolith.streams.ids import impressions_message_id
from monolith_client import ActionError, AsyncMonolithClient, MonolithClient, PredictError

T0 = 880_000_000.0  # 1997, like MovieLens: event time, not the wall clock
USER = {"user_id": 196, "age": 49, "gender": "M", "occupation": "writer", "zip": "55105"}
CANDIDATES = {"movie_id": [242, 302, 377], "genres": [["Comedy"], ["Crime", "Film-Noir"], ["Children's", "Comedy"]]}


Stack = ClientStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = Stack(str(tmp_path_factory.mktemp("nats")))
    yield started
    started.close()


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not HAVE_OPENSSL:
        pytest.skip("openssl is needed to make a test certificate")
    started = Stack(str(tmp_path_factory.mktemp("nats-tls")), tls=self_signed(tmp_path_factory.mktemp("tls")))
    yield started
    started.close()


def read(streams: StreamsConfig, stream: str) -> list[tuple[str, str, bytes]]:
    """Every message of `stream` as (subject, message id, data)."""
    return [(m.subject, m.headers.get(MSG_ID_HEADER, ""), m.data) for m in read_stream(streams, stream)]


def events(stack: Stack, request_id: str) -> list[tuple[str, str, pb.Event]]:
    decoded = [(s, m, pb.Event.FromString(data)) for s, m, data in read(stack.streams, EVENTS_STREAM)]
    return [(s, m, e) for s, m, e in decoded if getattr(e, e.WhichOneof("event")).request_id == request_id]


def samples(stack: Stack, request_id: str) -> list[pb.Sample]:
    decoded = [pb.Sample.FromString(data) for _, _, data in read(stack.streams, SAMPLES_STREAM)]
    return [s for s in decoded if s.request_id == request_id]


# --------------------------------------------------------------------------- tests


def test_score_then_report_action_makes_a_positive_sample(stack: Stack) -> None:
    with stack.client() as client:
        scores = client.score(USER, CANDIDATES, request_id="loop-1", event_time=T0)
        client.report_action("loop-1", item_id=302, kind="click", event_time=T0 + 5)

    [sample] = wait_for(lambda: samples(stack, "loop-1"), "the positive sample")

    assert (sample.item_id, sample.label, sample.sample_rate, sample.event_time) == ("302", 1.0, 1.0, T0)
    assert list(sample.features["genres"].values) == ["Crime", "Film-Noir"]
    assert list(sample.features["user_id"].values) == ["196"]
    logged = {i.item_id: i for _, _, e in events(stack, "loop-1") for i in logged_impressions(e)}
    assert sorted(logged) == ["242", "302", "377"]
    assert logged["302"].score == pytest.approx(float(scores[1]), abs=1e-7)


def test_a_request_id_reused_with_other_candidates_logs_and_joins_every_key(stack: Stack) -> None:
    first = {"movie_id": [242, 302], "genres": [["Comedy"], ["Crime"]]}
    second = {"movie_id": [377, 51], "genres": [["Children's"], ["Drama"]]}
    with stack.client() as client:
        client.score(USER, first, request_id="again", event_time=T0)
        client.score(USER, second, request_id="again", event_time=T0 + 1)
        client.report_actions([("again", 302, "click", 1.0, T0 + 5), ("again", 377, "click", 1.0, T0 + 6)])

    joined = wait_for(lambda: len(found := samples(stack, "again")) == 2 and found, "both calls' positives")
    impressions = wait_for(
        lambda: len(found := [i for _, _, e in events(stack, "again") for i in logged_impressions(e)]) == 4 and found,
        "both calls' impressions",
    )

    assert sorted((s.item_id, s.label, s.event_time) for s in joined) == [("302", 1.0, T0), ("377", 1.0, T0 + 1)]
    assert sorted(i.item_id for i in impressions) == ["242", "302", "377", "51"]


def test_keys_whose_bare_ids_would_read_alike_are_logged_and_joined_apart(stack: Stack) -> None:
    """("slash/a", "c") and ("slash", "a/c") would read alike unencoded: one dropped as a repeat."""
    with stack.client() as client:
        client.score(USER, {"movie_id": ["c"], "genres": [["Comedy"]]}, request_id="slash/a", event_time=T0)
        client.score(USER, {"movie_id": ["a/c"], "genres": [["Drama"]]}, request_id="slash", event_time=T0)
        client.report_actions([("slash/a", "c", "click", 1.0, T0 + 1), ("slash", "a/c", "click", 1.0, T0 + 1)])

    joined = wait_for(lambda: (found := samples(stack, "slash/a") + samples(stack, "slash")) and len(found) == 2
                      and found, "both keys' positives")  # fmt: skip

    assert sorted((s.request_id, s.item_id) for s in joined) == [("slash", "a/c"), ("slash/a", "c")]
    logged = {m for r in ("slash/a", "slash") for _, m, e in events(stack, r) if e.HasField("impressions")}
    assert logged == {impressions_message_id("slash/a", ["c"]), impressions_message_id("slash", ["a/c"])}


def test_report_actions_takes_dicts_and_tuples(stack: Stack) -> None:
    with stack.client() as client:
        accepted = client.report_actions(
            [
                {"request_id": "many", "item_id": 242, "event_time": T0 + 1},
                ("many", "302", "click", 0.0, T0 + 2),
                ("many", 377),  # kind click, label 1, the client's clock
            ]
        )

    assert accepted == 3
    actions = wait_for(lambda: len(found := events(stack, "many")) == 3 and found, "three actions")
    by_item = {e.action.item_id: (subject, msg_id, e.action) for subject, msg_id, e in actions}
    assert {item: a.label for item, (_, _, a) in by_item.items()} == {"242": 1.0, "302": 0.0, "377": 1.0}
    assert by_item["242"][2].event_time == T0 + 1 and by_item["302"][2].event_time == T0 + 2
    assert abs(by_item["377"][2].event_time - time.time()) < 600
    for item, (subject, msg_id, action) in by_item.items():
        assert subject == events_subject(partition_of("many", PARTITIONS))
        assert msg_id == f"act/many/{item}/click" and action.kind == "click"


def test_a_refused_action_raises_action_error_with_the_status(stack: Stack) -> None:
    with stack.client() as client:
        with pytest.raises(ActionError) as raised:
            client.report_actions([("refused", 1, "click", 1.0, T0), ("refused", 2, "teleport", 1.0, T0)])

    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "teleport" in raised.value.details
    assert events(stack, "refused") == []  # all or nothing


def test_score_without_a_request_id_logs_no_impression(stack: Stack) -> None:
    before = len(read(stack.streams, EVENTS_STREAM))
    with stack.client() as client:
        client.score(USER, CANDIDATES)
        client.score(USER, CANDIDATES, request_id="marker")

    wait_for(lambda: events(stack, "marker"), "the marker's impressions")
    assert len(read(stack.streams, EVENTS_STREAM)) == before + 1  # the marker's call, as one message


def test_report_action_without_a_joiner_address_says_what_is_missing() -> None:
    with MonolithClient("127.0.0.1:1") as client:  # nothing is called
        with pytest.raises(ValueError, match=r"needs the sample-joiner's address.*joiner_address="):
            client.report_action("r", 242)


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (("r",), "an action tuple is"),
        ({"request_id": "r"}, "needs a non-empty item_id"),
        ({"request_id": "", "item_id": 1}, "needs a non-empty request_id"),
        ({"request_id": "r", "item_id": 1, "colour": "red"}, "unknown action field"),
    ],
)
def test_malformed_actions_are_refused_before_any_call(action: Any, message: str) -> None:
    with MonolithClient("127.0.0.1:1", joiner_address="127.0.0.1:1") as client:
        with pytest.raises(ValueError, match=message):
            client.report_actions([action])


def test_the_asyncio_client_scores_reports_and_makes_a_sample(stack: Stack) -> None:
    now = time.time()  # another test reports an action at the client's clock: the watermark is near now

    async def main() -> tuple[list[float], int]:
        async with AsyncMonolithClient(stack.serving.address, joiner_address=stack.joiner.address, timeout=10) as client:
            scores = await client.score(USER, CANDIDATES, request_id="aio-1", event_time=now)
            accepted = await client.report_actions([("aio-1", 377, "click", 1.0, now + 3)])
            names = await client.input_names()
            assert {"movie_id", "genres", "request_id", "event_time"} <= set(names)
            with pytest.raises(ActionError) as refused:
                await client.report_action("aio-1", 242, kind="teleport")
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            return scores.tolist(), accepted

    scores, accepted = asyncio.run(main())
    with stack.client() as blocking:
        assert blocking.score(USER, CANDIDATES) == pytest.approx(scores, abs=1e-6)
    assert accepted == 1
    [sample] = wait_for(lambda: samples(stack, "aio-1"), "the positive sample")
    assert (sample.item_id, sample.label) == ("377", 1.0)


def test_over_tls_both_hops_score_and_report_and_plaintext_is_refused(tls_stack: Stack) -> None:
    with tls_stack.client() as client:
        scores = client.score(USER, CANDIDATES, request_id="tls-1", event_time=T0)
        assert client.report_action("tls-1", item_id=242, event_time=T0 + 2) is None
    assert scores.shape == (3,)
    [sample] = wait_for(lambda: samples(tls_stack, "tls-1"), "the positive sample, over TLS")
    assert (sample.item_id, sample.label) == ("242", 1.0)

    plain = MonolithClient(tls_stack.serving.address, joiner_address=tls_stack.joiner.address, timeout=5, retries=0)
    with plain:
        with pytest.raises(PredictError) as refused_predict:
            plain.score(USER, CANDIDATES)
        with pytest.raises(ActionError) as refused_action:
            plain.report_action("tls-2", 242)
    assert refused_predict.value.code == refused_action.value.code == grpc.StatusCode.UNAVAILABLE
