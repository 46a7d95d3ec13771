"""`monolith.streams.publish`'s rounds against a real nats-server: every message stored once, in
any number of concurrent rounds on one connection; what cannot be stored comes back failed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, samples_subject
from monolith.streams.jetstream import connect, ensure_streams
from monolith.streams.nats_server import NatsServer
from monolith.streams.publish import MSG_ID_HEADER, Message, publish_round
from monolith.streams.readback import read_stream


@pytest.fixture
def server(tmp_path) -> Iterator[NatsServer]:
    with NatsServer(str(tmp_path / "nats"), log_path=str(tmp_path / "nats.log")) as started:
        yield started


def config(server: NatsServer) -> StreamsConfig:
    return StreamsConfig(url=server.url, partitions=2, timeout=5.0)


def messages(tag: str, n: int) -> list[Message]:
    return [Message(samples_subject(k % 2), f"{tag}{k}".encode(), f"{tag}/{k}", {"k": str(k)}) for k in range(n)]


def test_concurrent_rounds_on_one_connection_store_every_message_once(server: NatsServer) -> None:
    async def main() -> list[list[Message]]:
        nc = await connect(config(server), "test-publish")
        try:
            js = nc.jetstream(timeout=5.0)
            await ensure_streams(js, config(server))
            rounds = [messages(tag, 700) for tag in "abc"]
            done = await asyncio.gather(*(publish_round(js, r, SAMPLES_STREAM, 30.0) for r in rounds))
            # Again: JetStream drops the repeats by message id, and they are acknowledged.
            again = await publish_round(js, rounds[0][:100], SAMPLES_STREAM, 30.0)
            return [d.failed for d in done] + [again.failed]
        finally:
            await nc.close()

    assert asyncio.run(main()) == [[], [], [], []]
    stored = read_stream(config(server), SAMPLES_STREAM)
    assert sorted(m.headers[MSG_ID_HEADER] for m in stored) == sorted(m.msg_id for tag in "abc" for m in messages(tag, 700))
    assert {m.headers[MSG_ID_HEADER]: m.data for m in stored}["b/5"] == b"b5"
    assert {m.headers[MSG_ID_HEADER]: m.headers["k"] for m in stored}["c/699"] == "699"


def test_a_missing_stream_and_a_subject_of_another_stream_fail_and_say_which(server: NatsServer) -> None:
    async def main() -> tuple[object, object, object]:
        nc = await connect(config(server), "test-publish")
        try:
            js = nc.jetstream(timeout=5.0)
            missing = await publish_round(js, messages("m", 3), SAMPLES_STREAM, 5.0)  # no streams yet
            await ensure_streams(js, config(server))
            elsewhere = await publish_round(js, messages("w", 3), EVENTS_STREAM, 5.0)  # samples.* is not EVENTS
            good = await publish_round(js, messages("g", 3), SAMPLES_STREAM, 5.0)
            return missing, elsewhere, good
        finally:
            await nc.close()

    missing, elsewhere, good = asyncio.run(main())
    assert missing.failed == messages("m", 3) and missing.stream_missing
    assert elsewhere.failed == messages("w", 3) and not elsewhere.stream_missing
    assert good.failed == [] and not good.stream_missing
    assert len(read_stream(config(server), SAMPLES_STREAM)) == 3


def test_a_round_with_the_server_gone_fails_within_its_timeout(server: NatsServer) -> None:
    async def main() -> tuple[list[Message], float]:
        nc = await connect(config(server), "test-publish")
        try:
            js = nc.jetstream(timeout=5.0)
            await ensure_streams(js, config(server))
            server.stop()
            started = asyncio.get_running_loop().time()
            done = await publish_round(js, messages("x", 50), SAMPLES_STREAM, 1.0)
            return done.failed, asyncio.get_running_loop().time() - started
        finally:
            await nc.close()

    failed, seconds = asyncio.run(main())
    assert failed == messages("x", 50)
    assert seconds < 30.0  # ends by its timeout (1 s), while the connection waits to reconnect
