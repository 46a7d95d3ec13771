"""The sample-joiner process against a real nats-server: exactly once across SIGKILLs, bad input.

Impressions are published to EVENTS the way model-serving does (an `Event` per candidate,
message id `imp/<request_id>/<item_id>`); actions go through the ReportActions API.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.api.joiner.v1 import joiner_pb2_grpc as pb_grpc
from monolith.common.process import RoleProcess, start_role, wait_healthy
from monolith.joiner.actions import action_message_id
from monolith.joiner.config import JoinerConfig
from monolith.joiner.window import PartitionJoin
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, events_subject, partition_of
from monolith.streams.jetstream import connect, ensure_streams
from monolith.streams.nats_server import NatsServer

PARTITIONS = 4
WINDOW = 1000.0
T0 = 880_000_000.0  # 1997, like MovieLens: event time, not the wall clock


@pytest.fixture
def nats(tmp_path) -> Iterator[NatsServer]:
    with NatsServer(str(tmp_path / "nats"), log_path=str(tmp_path / "nats.log")) as server:
        yield server


def start_joiner(nats: NatsServer, log: str, port: int | None = None) -> tuple[RoleProcess, str]:
    args = [
        "joiner", "--nats", nats.url, "--partitions", str(PARTITIONS), "--window", str(WINDOW),
        "--lateness", "0", "--duplicate-window", "0.1",  # the join alone must be exactly once
    ]  # fmt: skip
    if port is None:
        process, address = start_role(args, log)
    else:
        process = RoleProcess(["--log-level", "WARNING", *args, "--host", "127.0.0.1", "--port", str(port),
                               "--metrics-port", "0"], log)  # fmt: skip
        address = f"127.0.0.1:{port}"
    wait_healthy(address, timeout=60)
    return process, address


def streams(nats: NatsServer) -> StreamsConfig:
    return StreamsConfig(url=nats.url, partitions=PARTITIONS, duplicate_window=0.1)


def publish_events(nats: NatsServer, events: list[pb.Event]) -> None:
    """Stores events as their producers do: impressions as model-serving, actions as ReportActions."""

    async def main() -> None:
        nc = await connect(streams(nats), "test-producer")
        js = nc.jetstream()
        await ensure_streams(js, streams(nats))
        for event in events:
            if event.HasField("impression"):
                request_id, msg_id = event.impression.request_id, f"imp/{event.impression.request_id}/{event.impression.item_id}"
            else:
                request_id, msg_id = event.action.request_id, action_message_id(event.action)
            await js.publish(
                events_subject(partition_of(request_id, PARTITIONS)),
                event.SerializeToString(),
                headers={"Nats-Msg-Id": msg_id},
            )
        await nc.close()

    asyncio.run(main())


def stored_events(nats: NatsServer) -> list[tuple[str, int, bytes]]:
    """Every event on EVENTS: (subject, stream sequence, data)."""

    async def main() -> list[tuple[str, int, bytes]]:
        nc = await connect(streams(nats), "test-events")
        js = nc.jetstream()
        total = (await js.stream_info(EVENTS_STREAM)).state.messages
        sub = await js.pull_subscribe(
            "events.*", durable=None, stream=EVENTS_STREAM,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )  # fmt: skip
        out: list[tuple[str, int, bytes]] = []
        while len(out) < total:
            out.extend((m.subject, m.metadata.sequence.stream, m.data) for m in await sub.fetch(1000, timeout=5))
        await nc.close()
        return out

    return asyncio.run(main())


def samples_by_subject(nats: NatsServer) -> dict[str, list[bytes]]:
    """SAMPLES as stored: subject -> serialized samples in stream order (re-serialized deterministically)."""
    out: dict[str, list[bytes]] = {}
    for subject, sample in read_samples(nats, with_subjects=True):
        out.setdefault(subject, []).append(sample.SerializeToString(deterministic=True))
    return out


def read_samples(nats: NatsServer, with_subjects: bool = False):  # type: ignore[no-untyped-def]
    async def main() -> list:
        nc = await connect(streams(nats), "test-reader")
        js = nc.jetstream()
        try:
            info = await js.stream_info(SAMPLES_STREAM)
        except Exception:  # noqa: BLE001 - no stream yet: no samples
            await nc.close()
            return []
        total = info.state.messages
        out: list = []
        if total:
            sub = await js.pull_subscribe(
                "samples.*", durable=None, stream=SAMPLES_STREAM,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
            )  # fmt: skip
            while len(out) < total:
                for m in await sub.fetch(1000, timeout=5):
                    sample = pb.Sample.FromString(m.data)
                    out.append((m.subject, sample) if with_subjects else sample)
            await sub.unsubscribe()
        await nc.close()
        return out

    return asyncio.run(main())


def events_count(nats: NatsServer) -> int:
    async def main() -> int:
        nc = await connect(streams(nats), "test-count")
        info = await nc.jetstream().stream_info(EVENTS_STREAM)
        await nc.close()
        return info.state.messages

    return asyncio.run(main())


def wait_for(condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def make_impression(i: int) -> pb.Impression:
    imp = pb.Impression(request_id=f"r{i}", item_id=f"m{i % 7}", event_time=T0 + i, model_version=1, score=0.5)
    imp.features["user_id"].values.append(str(i % 50))
    imp.features["movie_id"].values.append(f"m{i % 7}")
    return imp


def flush_impressions(after: float) -> list[pb.Impression]:
    """One impression per partition far enough ahead in event time to close every window."""
    out, partition_found = [], set()
    i = 0
    while len(partition_found) < PARTITIONS:
        request_id = f"flush{i}"
        p = partition_of(request_id, PARTITIONS)
        if p not in partition_found:
            partition_found.add(p)
            out.append(pb.Impression(request_id=request_id, item_id="none", event_time=after + 2 * WINDOW))
        i += 1
    return out


def test_sigkill_of_the_joiner_mid_stream_yields_every_sample_exactly_once(nats: NatsServer, tmp_path) -> None:
    n = 4000
    positives = {f"r{i}" for i in range(0, n, 3)}

    def action(i: int) -> pb.Event:
        return pb.Event(action=pb.Action(
            request_id=f"r{i}", item_id=f"m{i % 7}", kind="click", label=1.0, event_time=T0 + i + 0.5,
        ))  # fmt: skip

    # In chunks, as live traffic: some actions just before their impression (they wait),
    # the impressions, then the other actions.
    events: list[pb.Event] = []
    for chunk in range(0, n, 200):
        chunk_ids = range(chunk, min(n, chunk + 200))
        events += [action(i) for i in chunk_ids if i % 3 == 0 and i % 2 == 0]
        events += [pb.Event(impression=make_impression(i)) for i in chunk_ids]
        events += [action(i) for i in chunk_ids if i % 3 == 0 and i % 2 == 1]
    publish_events(nats, events)

    joiner, address = start_joiner(nats, str(tmp_path / "joiner.log"))
    port = int(address.rsplit(":", 1)[1])
    # Kill it while it works through the backlog; restart; then kill it again while the
    # flush (one far-ahead impression per partition) closes every window at once.
    killed_at = [len(wait_for(lambda: read_samples(nats), 60, "the first samples"))]
    joiner.kill()
    joiner, _ = start_joiner(nats, str(tmp_path / "joiner.log"), port=port)
    before_flush = len(wait_for(lambda: (s := read_samples(nats)) and len(s) >= len(positives) and s, 60, "positives"))
    publish_events(nats, [pb.Event(impression=imp) for imp in flush_impressions(T0 + n)])
    killed_at.append(len(wait_for(lambda: (s := read_samples(nats)) and len(s) > before_flush and s, 60, "negatives")))
    joiner.kill()
    joiner, _ = start_joiner(nats, str(tmp_path / "joiner.log"), port=port)
    samples = wait_for(lambda: (s := read_samples(nats)) and len(s) >= n and s, 120, f"{n} samples")
    joiner.stop()
    assert killed_at[0] < n, f"the first kill came after the joiner had finished: {killed_at}"

    counts = Counter(s.request_id for s in samples)
    duplicated = {k: c for k, c in counts.items() if c > 1}
    assert not duplicated, f"{len(duplicated)} samples published more than once, e.g. {list(duplicated.items())[:3]}"
    expected = {f"r{i}" for i in range(n)}
    assert set(counts) == expected, f"lost: {sorted(expected - set(counts))[:5]}, extra: {sorted(set(counts) - expected)[:5]}"
    labels = {s.request_id: s.label for s in samples}
    assert {r for r, label in labels.items() if label == 1.0} == positives
    by_id = {s.request_id: s for s in samples}
    assert list(by_id["r4"].features["user_id"].values) == ["4"]
    assert by_id["r4"].event_time == T0 + 4

    # The stream holds exactly what one undisturbed join of the stored events decides, in order.
    joins: dict[str, PartitionJoin] = {}
    undisturbed: dict[str, list[bytes]] = {}
    for subject, seq, data in stored_events(nats):
        join = joins.setdefault(subject, PartitionJoin(JoinerConfig(window=WINDOW, lateness=0.0)))
        out = undisturbed.setdefault(subject.replace("events", "samples"), [])
        out.extend(e.sample.SerializeToString(deterministic=True) for e in join.add(seq, pb.Event.FromString(data)))
    assert samples_by_subject(nats) == undisturbed


BAD_ACTIONS = [
    (pb.Action(item_id="m", kind="click", label=1, event_time=T0), "request_id: is required"),
    (pb.Action(request_id="r", kind="click", label=1, event_time=T0), "item_id: is required"),
    (pb.Action(request_id="r", item_id="m", kind="buy", label=1, event_time=T0), "unknown action kind 'buy'"),
    (pb.Action(request_id="r", item_id="m", kind="click", label=2, event_time=T0), "label: must be in [0, 1]"),
    (pb.Action(request_id="r", item_id="m", kind="click", label=float("nan"), event_time=T0), "label"),
    (pb.Action(request_id="r", item_id="m", kind="click", label=1, event_time=0), "event_time: must be a finite"),
    (pb.Action(request_id="r", item_id="m", kind="click", label=1, event_time=float("inf")), "event_time"),
    (pb.Action(request_id="r", item_id="m", kind="click", label=1, event_time=4e9), "ahead of this server's clock"),
    (pb.Action(request_id="x" * 300, item_id="m", kind="click", label=1, event_time=T0), "bytes; at most 256"),
    (pb.Action(request_id="r\r\nNats-Msg-Id: x", item_id="m", kind="click", label=1, event_time=T0), "control characters"),
]


def test_bad_actions_are_invalid_argument_and_store_nothing(nats: NatsServer, tmp_path) -> None:
    joiner, address = start_joiner(nats, str(tmp_path / "joiner.log"))
    good = pb.Action(request_id="ok", item_id="m", kind="click", label=1, event_time=T0)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SampleJoinerStub(channel)
            assert stub.ReportActions(pb.ReportActionsRequest(actions=[good]), timeout=10).accepted == 1
            before = events_count(nats)
            for bad, message in BAD_ACTIONS:
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ReportActions(pb.ReportActionsRequest(actions=[good, bad]), timeout=10)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in caught.value.details(), caught.value.details()
                assert "actions[1]" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                stub.ReportActions(pb.ReportActionsRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as caught:
                stub.ReportActions(pb.ReportActionsRequest(actions=[good] * 10_001), timeout=10)
            assert "max_actions_per_request" in caught.value.details()
            assert events_count(nats) == before
            # Still serving, and a good call still stores.
            assert stub.ReportActions(pb.ReportActionsRequest(actions=[good]), timeout=10).accepted == 1
    finally:
        joiner.stop()


def test_report_actions_is_unavailable_while_nats_is_down_and_recovers(nats: NatsServer, tmp_path) -> None:
    joiner, address = start_joiner(nats, str(tmp_path / "joiner.log"))
    action = pb.Action(request_id="r", item_id="m", kind="click", label=1, event_time=T0)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SampleJoinerStub(channel)
            nats.stop()
            with pytest.raises(grpc.RpcError) as caught:
                stub.ReportActions(pb.ReportActionsRequest(actions=[action]), timeout=20)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            nats.start()

            def stored() -> bool:
                try:
                    return stub.ReportActions(pb.ReportActionsRequest(actions=[action]), timeout=10).accepted == 1
                except grpc.RpcError:
                    return False

            wait_for(stored, 60, "ReportActions to work again after NATS restarted")
            assert joiner.process.poll() is None
    finally:
        joiner.stop()
