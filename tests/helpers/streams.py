"""Streams in tests: reading EVENTS and SAMPLES back, and storing raw events as any NATS client could.

Reading is `monolith.streams.readback.read_stream` (the one read-back the harness uses too),
with the payloads decoded; publishing goes through `monolith.streams.publish`, bypassing
every API check, which is how a test plays an older release or a hostile producer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.streams.events import expand_impressions
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, events_subject, partition_of
from monolith.streams.ids import action_message_id, impression_message_id, impressions_message_id
from monolith.streams.jetstream import connect, ensure_streams
from monolith.streams.publish import MSG_ID_HEADER, Message, publish_round
from monolith.streams.readback import read_stream
from monolith.streams.reader import StoredMessage

__all__ = [
    "MSG_ID_HEADER", "StoredMessage", "event_message", "publish", "read_events", "read_samples", "read_stream",
    "request_id_of",
]  # fmt: skip


def read_events(config: StreamsConfig, subjects: str = ">") -> list[tuple[StoredMessage, pb.Event]]:
    """Every EVENTS message (on `subjects`) with its event decoded; [] before the stream exists."""
    return [(m, pb.Event.FromString(m.data)) for m in read_stream(config, EVENTS_STREAM, subjects)]


def read_samples(config: StreamsConfig, subjects: str = ">") -> list[tuple[StoredMessage, pb.Sample]]:
    """Every SAMPLES message (on `subjects`) with its sample decoded; [] before the stream exists."""
    return [(m, pb.Sample.FromString(m.data)) for m in read_stream(config, SAMPLES_STREAM, subjects)]


def logged_impressions(event: pb.Event) -> list[pb.Impression]:
    """The impressions an EVENTS message carries: one, or a Predict call's candidates expanded.

    Expands an `Impressions` message as the joiner does (`streams.events.expand_impressions`).
    """
    if event.HasField("impression"):
        return [event.impression]
    if event.HasField("impressions"):
        return expand_impressions(event.impressions)
    return []


def request_id_of(event: pb.Event) -> str:
    """The request_id of an impression or an action."""
    return getattr(event, event.WhichOneof("event")).request_id


def event_message(event: pb.Event, partitions: int) -> Message:
    """An event as its producer stores it: impressions as model-serving (a call's candidates in
    one message, or one per candidate as earlier releases), actions as ReportActions."""
    body = getattr(event, event.WhichOneof("event"))
    if event.HasField("impressions"):
        msg_id = impressions_message_id(body.request_id, [candidate.item_id for candidate in body.candidates])
    elif event.HasField("impression"):
        msg_id = impression_message_id(body.request_id, body.item_id)
    else:
        msg_id = action_message_id(body.request_id, body.item_id, body.kind)
    return Message(events_subject(partition_of(body.request_id, partitions)), event.SerializeToString(), msg_id)


def publish(config: StreamsConfig, messages: Sequence[Message], stream: str = EVENTS_STREAM) -> None:
    """Stores `messages` on `stream` in order (creating the streams if missing).

    Raises:
        AssertionError: some message was not stored.
    """

    async def main() -> None:
        nc = await connect(config, "test-producer", attempts=20)
        try:
            js = nc.jetstream(timeout=config.timeout)
            await ensure_streams(js, config)
            # One round holds at most the client's async-publish limit; one connection keeps the order.
            for start in range(0, len(messages), 1000):
                failed = (await publish_round(js, messages[start : start + 1000], stream, 30.0)).failed
                assert not failed, f"{len(failed)} messages not stored, e.g. {failed[0].msg_id}"
        finally:
            await nc.close()

    asyncio.run(main())
