"""The trainers' durable consumer against a real nats-server: a fetch takes what is there at
once, up to its maximum, and waits only while nothing is; acknowledgements need no round trip
of their own, and a flush makes the server hold them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from helpers.streams import publish
from helpers.waiting import wait_for
from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.streams.config import SAMPLES_STREAM, StreamsConfig, samples_subject
from monolith.streams.ids import sample_message_id
from monolith.streams.nats_server import NatsServer
from monolith.streams.publish import Message
from monolith.streams.pull_consumer import ConsumerSettings, DurableConsumer

WAIT = 2.0  # seconds a fetch may wait for a first message


@pytest.fixture
def consumer(tmp_path) -> Iterator[tuple[StreamsConfig, DurableConsumer]]:
    with NatsServer(str(tmp_path / "nats"), log_path=str(tmp_path / "nats.log")) as server:
        streams = StreamsConfig(url=server.url, partitions=2, timeout=5.0)
        made = DurableConsumer(streams, ConsumerSettings(SAMPLES_STREAM, "samples.>", "trainer"), "test")
        made.open()
        yield streams, made
        made.close()


def samples(streams: StreamsConfig, first: int, count: int) -> None:
    messages = [Message(samples_subject(i % 2), pb.Sample(request_id=f"r{i}").SerializeToString(),
                        sample_message_id(f"r{i}", "m")) for i in range(first, first + count)]  # fmt: skip
    publish(streams, messages, SAMPLES_STREAM)


def timed_fetch(consumer: DurableConsumer, max_messages: int) -> tuple[int, float]:
    started = time.monotonic()
    got = consumer.fetch(max_messages, WAIT)
    consumer.ack(got)
    return len(got), time.monotonic() - started


def test_a_fetch_takes_a_backlog_in_full_steps_and_a_trickle_message_by_message(
    consumer: tuple[StreamsConfig, DurableConsumer],
) -> None:
    streams, durable = consumer
    # Nothing there: it waits its whole timeout, then answers nothing.
    assert timed_fetch(durable, 512)[0] == 0

    # A backlog: full steps without waiting for more, then the rest without waiting either.
    samples(streams, 0, 1100)
    steps = [timed_fetch(durable, 512) for _ in range(3)]
    assert [n for n, _ in steps] == [512, 512, 76]
    # None of them waited out the fetch's timeout (the last took what was left and answered).
    assert all(seconds < WAIT / 2 for _, seconds in steps), steps

    # A trickle: one message, answered alone at once rather than after waiting for a batch.
    samples(streams, 1100, 1)
    assert timed_fetch(durable, 512)[0] == 1
    durable.flush()
    wait_for(lambda: durable.state().ack_floor == 1101 and durable.state().ack_pending == 0,
             "every acknowledgement held by the server", timeout=10)  # fmt: skip


def test_acknowledgements_reach_the_server_without_a_flush_of_their_own(
    consumer: tuple[StreamsConfig, DurableConsumer],
) -> None:
    streams, durable = consumer
    samples(streams, 0, 10)
    got = durable.fetch(10, WAIT)
    assert len(got) == 10 and durable.state().ack_pending == 10
    durable.ack(got)
    # They go out with the connection's next write; no round trip is spent on them.
    wait_for(lambda: durable.state().ack_pending == 0, "the acknowledgements held by the server", timeout=10)
    assert durable.state().ack_floor == 10
