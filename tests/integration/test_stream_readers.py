"""monolith.streams' readers, watch and state store against a real nats-server, and the replay's
SampleLog and ImpressionWatch on top of them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from helpers.streams import publish, read_samples
from helpers.waiting import wait_for
from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.harness.replay.samples import ImpressionWatch, SampleLog
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, events_subject, samples_subject
from monolith.streams.ids import impression_message_id, impressions_message_id, sample_message_id
from monolith.streams.jetstream import connect
from monolith.streams.nats_server import NatsServer
from monolith.streams.publish import MSG_ID_HEADER, Message
from monolith.streams.readback import read_stream
from monolith.streams.reader import OrderedReader, StoredMessage, last_message
from monolith.streams.state_store import StateStore
from monolith.streams.watch import StreamWatch

PARTITIONS = 2


@pytest.fixture
def streams(tmp_path) -> Iterator[StreamsConfig]:
    with NatsServer(str(tmp_path / "nats"), log_path=str(tmp_path / "nats.log")) as server:
        yield StreamsConfig(url=server.url, partitions=PARTITIONS, timeout=5.0)


def sample_message(partition: int, request_id: str, label: float = 1.0) -> Message:
    sample = pb.Sample(request_id=request_id, item_id="m", label=label)
    return Message(samples_subject(partition), sample.SerializeToString(), sample_message_id(request_id, "m"),
                   {"src-seq": "1"})  # fmt: skip


def test_read_stream_returns_every_message_in_order_with_its_headers(streams: StreamsConfig) -> None:
    assert read_stream(streams, SAMPLES_STREAM) == []  # no stream yet
    publish(streams, [sample_message(k % 2, f"r/{k}") for k in range(2500)], SAMPLES_STREAM)

    everything = read_stream(streams, SAMPLES_STREAM)
    one = read_stream(streams, SAMPLES_STREAM, samples_subject(1))

    assert [m.sequence for m in everything] == list(range(1, 2501))
    assert everything[3].subject == "samples.1" and everything[3].headers["src-seq"] == "1"
    assert everything[3].headers[MSG_ID_HEADER] == "smp/r%2F3/m"
    assert [pb.Sample.FromString(m.data).request_id for m in one] == [f"r/{k}" for k in range(1, 2500, 2)]
    assert read_stream(streams, EVENTS_STREAM) == []  # exists, empty


def test_an_ordered_reader_starts_where_asked_and_last_message_finds_the_newest(streams: StreamsConfig) -> None:
    publish(streams, [sample_message(0, f"r{k}") for k in range(10)], SAMPLES_STREAM)

    async def main() -> tuple[list[int], int, StoredMessage | None, StoredMessage | None]:
        nc = await connect(streams, "test")
        js = nc.jetstream()
        reader = await OrderedReader.open(js, SAMPLES_STREAM, samples_subject(0), 7)
        pending = reader.pending
        read = [m.sequence for m in await reader.fetch(100, 2.0)]
        assert await reader.fetch(1, 0.2) == [] and reader.pending == 0  # caught up: nothing within the timeout
        await reader.close(drop=True)
        headers_only = await OrderedReader.open(js, SAMPLES_STREAM, samples_subject(0), 10, headers_only=True)
        [bare] = await headers_only.fetch(10, 2.0)
        assert (bare.sequence, bare.data, bare.headers["src-seq"]) == (10, b"", "1")
        await headers_only.close(drop=True)
        last, none = await last_message(js, SAMPLES_STREAM, "samples.0"), await last_message(js, SAMPLES_STREAM, "samples.1")
        await nc.close()
        return read, pending, last, none

    read, pending, last, none = asyncio.run(main())

    assert read == [7, 8, 9, 10] and pending == 4
    assert last is not None and last.sequence == 10 and pb.Sample.FromString(last.data).request_id == "r9"
    assert none is None


def test_the_state_store_keeps_the_last_blob_under_each_name(streams: StreamsConfig) -> None:
    async def main() -> tuple[bytes | None, bytes | None, bytes | None]:
        nc = await connect(streams, "test")
        js = nc.jetstream()
        for _ in range(2):  # safe to repeat
            await StateStore.ensure(js, "TEST_STATE", "test", replicas=1)
        store = await StateStore.open(js, "TEST_STATE")
        missing = await store.get("a")
        await store.put("a", b"one")
        await store.put("a", b"two" * 100_000)
        await store.put("b", b"")
        got = await store.get("a"), await store.get("b")
        assert [await store.exists(name) for name in ("a", "b", "c")] == [True, True, False]
        await store.delete("b")
        await store.delete("c")  # nothing there: nothing to do
        assert not await store.exists("b") and await store.get("b") is None
        await store.put("b", b"again")
        assert await store.get("b") == b"again"
        await nc.close()
        return missing, *got

    missing, a, b = asyncio.run(main())

    assert missing is None and a == b"two" * 100_000 and b == b""


def test_a_watch_follows_from_the_start_or_new_messages_only(streams: StreamsConfig) -> None:
    publish(streams, [sample_message(0, "old")], SAMPLES_STREAM)
    seen: dict[str, list[StoredMessage]] = {"all": [], "new": []}
    lock = threading.Lock()

    def collect(into: str):  # type: ignore[no-untyped-def]
        def on_message(message: StoredMessage) -> None:
            with lock:
                seen[into].append(message)

        return on_message

    watch = StreamWatch(streams, "test-watch")
    try:
        watch.follow(SAMPLES_STREAM, "samples.*", collect("all"), from_start=True)
        watch.follow(SAMPLES_STREAM, "samples.*", collect("new"), from_start=False, headers_only=True)
        publish(streams, [sample_message(1, "new")], SAMPLES_STREAM)
        wait_for(lambda: len(seen["all"]) == 2 and len(seen["new"]) == 1, "both deliveries")
        state = watch.stream_state(SAMPLES_STREAM)
        assert watch.consumer_state(SAMPLES_STREAM, "nobody") is None
    finally:
        watch.close()

    assert [pb.Sample.FromString(m.data).request_id for m in seen["all"]] == ["old", "new"]
    assert seen["new"][0].data == b"" and seen["new"][0].headers[MSG_ID_HEADER] == "smp/new/m"
    assert (state.messages, state.first_sequence, state.last_sequence) == (2, 1, 2)


def test_the_replays_sample_log_and_impression_watch_read_their_run_only(streams: StreamsConfig) -> None:
    publish(streams, [sample_message(0, "run-1", 1.0), sample_message(1, "other-1"), sample_message(0, "run-2", 0.0)],
            SAMPLES_STREAM)  # fmt: skip
    samples = SampleLog(streams, "run-")
    watch = ImpressionWatch(streams, "run-/")
    stored: list[str] = []
    try:
        samples.start()
        watch.start()
        watch.after_stored("run-/7", lambda: stored.append("run-/7"))
        watch.after_stored("run-/8", lambda: stored.append("run-/8"))
        impressions = [
            pb.Event(impression=pb.Impression(request_id=r, item_id="a/b", event_time=1.0)) for r in ("x", "run-/7")
        ]
        call = pb.Impressions(request_id="run-/8", event_time=1.0, candidates=[pb.Candidate(item_id="a/b")])
        publish(streams, [Message(events_subject(0), e.SerializeToString(),
                                  impression_message_id(e.impression.request_id, "a/b")) for e in impressions]
                + [Message(events_subject(0), pb.Event(impressions=call).SerializeToString(),
                           impressions_message_id("run-/8", ["a/b"]))])  # fmt: skip
        wait_for(lambda: samples.counts() == (2, 1) and samples.caught_up(), "the run's samples")
        wait_for(lambda: stored == ["run-/7", "run-/8"], "the run's impressions, one and a call's")
        assert samples.samples() == [(("run-1", "m"), 1.0), (("run-2", "m"), 0.0)]
        assert samples.events_stored() == 3
        assert samples.consumer_lag("nobody") is None
    finally:
        samples.close()
        watch.close()
    assert len(read_samples(streams)) == 3

