"""monolith.streams.transfer (reading a stream's head, copying it to another server) and
monolith.streams.bare_publish against real nats-servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.streams import publish
from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.streams.bare_publish import BarePublisher
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, samples_subject
from monolith.streams.ids import sample_message_id
from monolith.streams.nats_server import NatsServer
from monolith.streams.publish import MSG_ID_HEADER, Message
from monolith.streams.readback import read_stream
from monolith.streams.transfer import copy_head, head

PARTITIONS = 2
# Room for EVENTS, SAMPLES and BARE once each at their default limits, and not for a stream's
# limit reserved twice: the tests do not depend on this machine's free disk, and setting up a
# stream that exists must not reserve its storage again (it once failed CI on a smaller disk).
STORE_BYTES = 2 * StreamsConfig().samples_max_bytes + StreamsConfig().events_max_bytes + (1 << 30)


def _server(directory) -> Iterator[StreamsConfig]:
    with NatsServer(str(directory / "nats"), log_path=str(directory / "nats.log"), max_store_bytes=STORE_BYTES) as server:
        yield StreamsConfig(url=server.url, partitions=PARTITIONS, timeout=5.0)


@pytest.fixture
def source(tmp_path) -> Iterator[StreamsConfig]:
    yield from _server(tmp_path / "source")


@pytest.fixture
def target(tmp_path) -> Iterator[StreamsConfig]:
    yield from _server(tmp_path / "target")


def sample_message(k: int) -> Message:
    sample = pb.Sample(request_id=f"r{k}", item_id="m", label=float(k % 2))
    return Message(samples_subject(k % PARTITIONS), sample.SerializeToString(), sample_message_id(f"r{k}", "m"),
                   {"src-seq": str(k)})  # fmt: skip


def test_head_reads_the_first_messages_up_to_a_sequence_and_a_filter(source: StreamsConfig) -> None:
    publish(source, [sample_message(k) for k in range(2_500)], SAMPLES_STREAM)

    first = head(source, SAMPLES_STREAM, ">", 1_200)
    assert [m.sequence for m in first] == list(range(1, 1_201))
    assert first[7].headers["src-seq"] == "7" and first[7].subject == "samples.1"
    assert [m.sequence for m in head(source, SAMPLES_STREAM, ">", 100, last_sequence=40)] == list(range(1, 41))
    odd = head(source, SAMPLES_STREAM, ">", 10, keep=lambda m: m.sequence % 2 == 1)
    assert [m.sequence for m in odd] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert len(head(source, SAMPLES_STREAM, ">", 10_000)) == 2_500


def test_copy_head_stores_the_same_messages_on_the_other_server(source: StreamsConfig, target: StreamsConfig) -> None:
    publish(source, [sample_message(k) for k in range(1_500)], SAMPLES_STREAM)

    assert copy_head(source, target, SAMPLES_STREAM, ">", 1_200, last_sequence=1_100) == 1_100
    copied, original = read_stream(target, SAMPLES_STREAM), read_stream(source, SAMPLES_STREAM)[:1_100]
    assert [(m.subject, m.data, m.headers) for m in copied] == [(m.subject, m.data, m.headers) for m in original]
    assert read_stream(target, EVENTS_STREAM) == []  # both streams are set up, only SAMPLES copied
    assert copy_head(source, target, SAMPLES_STREAM, ">", 50) == 50
    assert len(read_stream(target, SAMPLES_STREAM)) == 1_100  # the same ids again: dropped as duplicates


def test_bare_publisher_stores_copies_with_fresh_ids_and_reports_a_rate(source: StreamsConfig) -> None:
    publish(source, [sample_message(k) for k in range(10)], SAMPLES_STREAM)
    templates = read_stream(source, SAMPLES_STREAM)

    with BarePublisher(source, "BARE", templates) as bare:
        rate = bare.round(0.2)
        stored = read_stream(source, "BARE")
    assert rate > 0 and len(stored) >= 1_000 and len(stored) % 1_000 == 0  # whole chunks
    assert len({m.headers[MSG_ID_HEADER] for m in stored}) == len(stored)
    assert stored[3].data == templates[3].data and stored[3].headers["src-seq"] == "3"
    assert stored[3].subject == "bare.1"
    assert bare.message_bytes > len(templates[0].data)
    for _ in range(2):  # opening again starts from an empty stream, within the store's limit
        with BarePublisher(source, "BARE", templates):
            assert read_stream(source, "BARE") == []
    with pytest.raises(ValueError):
        BarePublisher(source, "BARE", [])
