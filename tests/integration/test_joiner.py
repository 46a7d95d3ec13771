"""The sample-joiner process against a real nats-server: exactly once across SIGKILLs, bad input.

Impressions are published to EVENTS as the producers do: one `Event(impression=...)` per
candidate (message id `imp/<request_id>/<item_id>`, earlier model-serving releases), or one
`Event(impressions=...)` per Predict call (`imps/<request_id>/<digest>`, model-serving now);
actions as ReportActions stores them.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from helpers.streams import event_message, publish, read_stream
from helpers.streams import read_samples as read_samples_with_messages
from helpers.metrics import metrics_url, poll_metrics, read_metrics
from helpers.waiting import wait_for
from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.api.joiner.v1 import joiner_pb2_grpc as pb_grpc
from monolith.common import failpoints
from monolith.common.process import RoleProcess, free_port, start_role, wait_healthy
from monolith.joiner import metrics
from monolith.joiner.config import JoinerConfig
from monolith.joiner.partition import STATE_BUCKET, sample_position
from monolith.joiner.runtime import JoinerRuntime
from monolith.joiner.snapshots import Snapshots
from monolith.joiner.window import PartitionJoin
from monolith.model.quality import auc
from monolith.streams.config import (
    EVENTS_STREAM,
    SAMPLES_STREAM,
    StreamsConfig,
    events_subject,
    partition_of,
    samples_subject,
)
from monolith.streams.jetstream import connect
from monolith.streams.nats_server import NatsServer
from monolith.streams.publish import Message
from monolith.streams.state_store import StateStore
from monolith.streams.watch import StreamWatch

PARTITIONS = 4
WINDOW = 1000.0
T0 = 880_000_000.0  # 1997, like MovieLens: event time, not the wall clock


@pytest.fixture
def nats(tmp_path) -> Iterator[NatsServer]:
    with NatsServer(str(tmp_path / "nats"), log_path=str(tmp_path / "nats.log")) as server:
        yield server


def joiner_args(nats: NatsServer) -> list[str]:
    return [
        "joiner", "--nats", nats.url, "--partitions", str(PARTITIONS), "--window", str(WINDOW),
        "--lateness", "0", "--duplicate-window", "0.1",  # the join alone must be exactly once
    ]  # fmt: skip


def start_joiner(nats: NatsServer, log: str, port: int | None = None) -> tuple[RoleProcess, str]:
    args = joiner_args(nats)
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
    publish(streams(nats), [event_message(event, PARTITIONS) for event in events])


Stored = dict[str, list[tuple[tuple[int, int, int], bytes]]]


def samples_by_subject(nats: NatsServer) -> Stored:
    """SAMPLES as stored: subject -> (position, serialized sample) sorted by position.

    Sorted: a sample whose publish failed in a batch whose later ones were stored is
    published again after them (see joiner.partition); what must hold is the set, once each.
    """
    out: Stored = {}
    for message, sample in read_samples_with_messages(streams(nats)):
        out.setdefault(message.subject, []).append(
            (sample_position(message.headers), sample.SerializeToString(deterministic=True))
        )
    return {subject: sorted(stored) for subject, stored in out.items()}


def undisturbed_join(nats: NatsServer) -> Stored:
    """What one undisturbed join of the stored events decides: subject -> (position, sample) in order."""
    joins: dict[str, PartitionJoin] = {}
    out: Stored = {}
    for stored in read_stream(streams(nats), EVENTS_STREAM):
        join = joins.setdefault(stored.subject, PartitionJoin(JoinerConfig(window=WINDOW, lateness=0.0)))
        emitted = join.add(stored.sequence, pb.Event.FromString(stored.data))
        out.setdefault(stored.subject.replace("events", "samples"), []).extend(
            (e.position, e.sample.SerializeToString(deterministic=True)) for e in emitted
        )
    return {subject: samples for subject, samples in out.items() if samples}


def samples_count(watch: StreamWatch) -> int:
    """Messages on SAMPLES now (one request: cheap enough to poll)."""
    return watch.stream_state(SAMPLES_STREAM).messages


def read_samples(nats: NatsServer) -> list[pb.Sample]:
    return [sample for _, sample in read_samples_with_messages(streams(nats))]


def events_count(nats: NatsServer) -> int:
    return len(read_stream(streams(nats), EVENTS_STREAM))


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
    killed_at = [len(wait_for(lambda: read_samples(nats), "the first samples", 60))]
    joiner.kill()
    joiner, _ = start_joiner(nats, str(tmp_path / "joiner.log"), port=port)
    before_flush = len(wait_for(lambda: (s := read_samples(nats)) and len(s) >= len(positives) and s, "positives", 60))
    publish_events(nats, [pb.Event(impression=imp) for imp in flush_impressions(T0 + n)])
    killed_at.append(len(wait_for(lambda: (s := read_samples(nats)) and len(s) > before_flush and s, "negatives", 60)))
    joiner.kill()
    joiner, _ = start_joiner(nats, str(tmp_path / "joiner.log"), port=port)
    samples = wait_for(lambda: (s := read_samples(nats)) and len(s) >= n and s, f"{n} samples", 120)
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

    # The stream holds exactly what one undisturbed join of the stored events decides.
    assert samples_by_subject(nats) == undisturbed_join(nats)


def call_message(k: int, candidates: int) -> Message:
    """Predict call k as model-serving logs it: its candidates in one `Impressions` message."""
    call = pb.Impressions(request_id=f"c{k}", event_time=T0 + k, model_version=2)
    call.shared_features["user_id"].values.append(str(k % 50))
    for j in range(candidates):
        candidate = call.candidates.add(item_id=f"m{j}", score=j / candidates)
        candidate.features["movie_id"].values.append(f"m{j}")
    return event_message(pb.Event(impressions=call), PARTITIONS)


def saved_through(nats: NatsServer) -> dict[str, int]:
    """events subject -> the last event sequence the partition's saved join covers (0: none saved)."""

    async def main() -> dict[str, int]:
        nc = await connect(streams(nats), "test-joiner-state")
        try:
            store = await StateStore.open(nc.jetstream(), STATE_BUCKET)
            loaded = [await Snapshots(store, p).load(JoinerConfig()) for p in range(PARTITIONS)]
            return {events_subject(p): join.last_seq for p, (join, _) in enumerate(loaded)}
        finally:
            await nc.close()

    return asyncio.run(main())


def last_events(nats: NatsServer) -> dict[str, int]:
    """events subject -> the sequence of its last event."""
    return {m.subject: m.sequence for m in read_stream(streams(nats), EVENTS_STREAM)}


def crash_armed_joiner(nats: NatsServer, log: str, port: int, rounds: int) -> RoleProcess:
    """A joiner that SIGKILLs itself right after its `rounds`-th acknowledged publish round, other
    partitions' rounds in flight (a failpoint: a kill from outside can land anywhere, even after
    the last sample on a loaded machine). Not waited for: it may die before it would be healthy."""
    args = ["--log-level", "WARNING", *joiner_args(nats), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0"]  # fmt: skip
    return RoleProcess(args, log, env=failpoints.environment({"joiner.round_published": rounds}))


def wait_killed(joiner: RoleProcess, what: str) -> None:
    try:
        code = joiner.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        joiner.kill()
        raise AssertionError(f"{what} did not reach its failpoint in 120 s") from None
    assert code == -signal.SIGKILL, f"{what} exited with {code}, not by its failpoint's SIGKILL"


def test_a_joiner_killed_while_publishing_a_burst_in_batches_leaves_one_undisturbed_join(
    nats: NatsServer, tmp_path
) -> None:
    """Predict calls' impressions and their clicks, joined and saved; then one far-ahead
    impression per partition closes every window at once: thousands of samples decided by
    one event, published in batches. SIGKILL while they are published, then again while the
    restarted joiner publishes; after the last restart SAMPLES is one undisturbed join: no
    sample lost, none twice."""
    calls, candidates = 600, 50
    clicks = [pb.Event(action=pb.Action(request_id=f"c{k}", item_id=f"m{j}", kind="click", label=1.0,
                                        event_time=T0 + k + 0.5))
              for k in range(calls) for j in range(candidates) if (k + j) % 9 == 0]  # fmt: skip
    publish(streams(nats), [call_message(k, candidates) for k in range(calls)])
    publish_events(nats, clicks)
    watch = StreamWatch(streams(nats), "test-samples-count")
    log = str(tmp_path / "joiner.log")
    joiner, address = start_joiner(nats, log)
    port = int(address.rsplit(":", 1)[1])
    try:
        # The clicks' samples are out and the joins saved past them (their samples_seq with them)...
        wait_for(lambda: samples_count(watch) == len(clicks), "the clicks' samples", 120)
        wait_for(lambda: saved_through(nats) == last_events(nats), "the joins saved past the clicks", 60)
        joiner.stop()
        # ...then the negatives the flush decides all at once, in rounds: killed after three.
        killed = crash_armed_joiner(nats, log, port, rounds=3)
        publish_events(nats, [pb.Event(impression=imp) for imp in flush_impressions(T0 + calls)])
        wait_killed(killed, "the joiner publishing the negatives")
        killed_at = [samples_count(watch)]
        # Restarted, it repairs what the killed one left (gaps, samples stored past its last
        # acknowledgement) and is killed again after its first round.
        killed = crash_armed_joiner(nats, log, port, rounds=1)
        wait_killed(killed, "the restarted joiner")
        killed_at.append(samples_count(watch))
        joiner, _ = start_joiner(nats, log, port=port)
        expected = undisturbed_join(nats)
        total = sum(map(len, expected.values()))
        assert total == calls * candidates
        wait_for(lambda: samples_count(watch) >= total, f"{total} samples", 120)
    finally:
        joiner.stop()
        watch.close()
    assert len(clicks) < killed_at[0] < killed_at[1] < total, f"kills after {killed_at} of {total} samples"
    stored = samples_by_subject(nats)
    assert sum(map(len, stored.values())) == total, f"stored {sum(map(len, stored.values()))}, expected {total}"
    assert stored == expected


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

            wait_for(stored, "ReportActions to work again after NATS restarted", 60)
            assert joiner.process.poll() is None
    finally:
        joiner.stop()


def hostile_messages(partition: int, batch: int) -> list[Message]:
    """Events no API stores, published straight onto `events.<partition>` (an older release, a
    direct NATS client): ids with CR/LF, LF, NUL, C1, 64 KiB, empty; a call's impressions with
    no candidate, or one bad candidate among good ones; bytes that are no event; a string
    field that is not UTF-8."""
    bad_ids = ["r\r\nNats-Msg-Id: x", "r\n", "r\x00", "r\x85", "r" * 65536, ""]
    events = [pb.Event(impression=pb.Impression(request_id=bad, item_id="m", event_time=T0)) for bad in bad_ids]
    events += [pb.Event(impression=pb.Impression(request_id="hostile", item_id=bad, event_time=T0)) for bad in bad_ids]
    events += [pb.Event(action=pb.Action(request_id=bad, item_id="m", kind="click", label=1, event_time=T0))
               for bad in bad_ids]  # fmt: skip
    events += [pb.Event(impressions=pb.Impressions(request_id="hostile", event_time=T0)),  # no candidates
               pb.Event(impressions=pb.Impressions(request_id="hostile", event_time=T0, candidates=[
                   pb.Candidate(item_id="m"), pb.Candidate(item_id=bad_ids[0])]))]  # fmt: skip
    payloads = [event.SerializeToString() for event in events]
    not_utf8 = pb.Event(impression=pb.Impression(request_id="@@", item_id="m", event_time=T0)).SerializeToString()
    payloads += [b"\xff\xff no event", not_utf8.replace(b"@@", b"\xff\xfe")]
    return [Message(events_subject(partition), data, f"hostile-{batch}-{i}") for i, data in enumerate(payloads)]


def test_hostile_events_are_skipped_and_the_clean_traffic_behind_them_still_becomes_samples(
    nats: NatsServer,
) -> None:
    config = streams(nats)
    partition = 1
    clean = [r for r in (f"clean-{k}" for k in range(1000)) if partition_of(r, PARTITIONS) == partition][:12]

    def traffic(request_ids: list[str]) -> list[Message]:
        events = [pb.Event(impression=make_impression(0)) for _ in request_ids]
        for event, request_id in zip(events, request_ids):
            event.impression.request_id = request_id
        events += [pb.Event(action=pb.Action(request_id=r, item_id="m0", kind="click", label=1, event_time=T0 + 1))
                   for r in request_ids]  # fmt: skip
        return [event_message(event, PARTITIONS) for event in events]

    def positives() -> list[str]:
        return sorted(s.request_id for _, s in read_samples_with_messages(config, samples_subject(partition)))

    label = str(partition)
    bad_before, restarts_before = metrics.BAD_EVENTS.labels(label)._value.get(), metrics.RESTARTS.labels(label)._value.get()
    # The hostile events first, then clean traffic behind them, while the joiner is down...
    publish(config, hostile_messages(partition, 1) + traffic(clean[:6]))
    runtime = JoinerRuntime(config, JoinerConfig(window=WINDOW, lateness=0.0), range(PARTITIONS))
    runtime.start(on_ready=lambda: None)
    try:
        wait_for(lambda: positives() == sorted(clean[:6]), "the clean positives behind the hostile events", 60)
        # ...and while it runs: the partition keeps joining.
        publish(config, hostile_messages(partition, 2) + traffic(clean[6:]))
        wait_for(lambda: positives() == sorted(clean), "the clean positives published after more hostile events", 60)
        reader = next(r for r in runtime.readers if r.partition == partition)
        assert reader.restarts == 0 and metrics.RESTARTS.labels(label)._value.get() == restarts_before
        assert metrics.BAD_EVENTS.labels(label)._value.get() - bad_before == 2 * len(hostile_messages(partition, 0))
    finally:
        runtime.stop()
    for message, sample in read_samples_with_messages(config):
        assert message.headers["Nats-Msg-Id"] == f"smp/{sample.request_id}/{sample.item_id}"


def test_the_joiner_exports_the_served_models_quality_from_the_samples_it_publishes(nats: NatsServer, tmp_path) -> None:
    calls, candidates = 60, 10
    # Candidate j of call k was served score j/10; the user clicks the higher-scored ones
    # more often (j >= 7, and j == 2 on every fifth call), each 30 s (event time) after the call.
    clicked = {(f"c{k}", f"m{j}") for k in range(calls) for j in range(candidates) if j >= 7 or (j == 2 and k % 5 == 0)}
    events = [event_message(pb.Event(action=pb.Action(request_id=r, item_id=i, kind="click", label=1.0,
                                                      event_time=T0 + int(r[1:]) + 30.0)), PARTITIONS)
              for r, i in sorted(clicked)]  # fmt: skip
    flush = [event_message(pb.Event(impression=imp), PARTITIONS) for imp in flush_impressions(T0 + calls)]
    publish(streams(nats), [call_message(k, candidates) for k in range(calls)] + events + flush)
    metrics_port = free_port()
    joiner = RoleProcess(["--log-level", "WARNING", *joiner_args(nats), "--host", "127.0.0.1", "--port", str(free_port()),
                          "--metrics-port", str(metrics_port), "--quality-window", "1000"], str(tmp_path / "joiner.log"))  # fmt: skip
    try:
        url = metrics_url(metrics_port)
        wait_for(lambda: poll_metrics(url).sum("monolith_joiner_quality_samples") >= calls * candidates,
                 "every call's samples in the quality window", 60)  # fmt: skip
        page = read_metrics(url)
    finally:
        joiner.stop()

    samples = [s for s in read_samples(nats) if s.request_id.startswith("c")]
    assert len(samples) == calls * candidates
    labels = np.array([s.label for s in samples])
    scores = np.array([int(s.item_id[1:]) / candidates for s in samples], dtype=np.float32)
    assert page.sum("monolith_joiner_served_auc") == pytest.approx(auc(labels, scores))
    assert page.sum("monolith_joiner_positive_rate") == pytest.approx(len(clicked) / (calls * candidates))
    assert page.sum("monolith_joiner_calibration_ratio") == pytest.approx(scores.mean() / labels.mean(), rel=1e-6)
    assert page.sum("monolith_joiner_label_delay_seconds_count") == len(clicked)
    assert page.sum("monolith_joiner_label_delay_seconds_sum") == pytest.approx(30.0 * len(clicked))
    assert page.sum("monolith_joiner_label_delay_seconds_bucket", le="15.0") == 0
    assert page.sum("monolith_joiner_label_delay_seconds_bucket", le="30.0") == len(clicked)
