"""Joining one partition on JetStream: read `events.<p>` in order, publish `samples.<p>`.

Exactly once without acknowledgements (after STREAMS.md): the join is a deterministic
function of the partition's events (see window), every sample carries the position it was
decided at (`src-seq`, `win-seq` headers), and the join's whole state is saved now and then
(a snapshot in the object store `JOINER_STATE`, taken after every sample of the events it
covers is published). On start, and after any failure (a lost connection, a publish with no
answer, a gap in delivery), the reader restores the last snapshot, re-reads the events
after it, and publishes only the samples after the last one on `samples.<p>`. So a
SIGKILL at any moment loses nothing and duplicates nothing; the `Nats-Msg-Id` header is a
second guard, not the mechanism. EVENTS must keep the events since the last snapshot.

Samples are published one at a time, each waiting for its acknowledgement: a later sample
must never be stored while an earlier one is not, or the restart would skip the gap.
Partitions run concurrently, so throughput comes from their number.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping

from google.protobuf.message import DecodeError

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.common.errors import describe
from monolith.joiner import metrics
from monolith.joiner.config import JoinerConfig
from monolith.joiner.window import Emitted, PartitionJoin
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, events_subject, samples_subject
from monolith.streams.ids import sample_message_id
from monolith.streams.jetstream import TRANSIENT_ERRORS, JetStream
from monolith.streams.publish import Message, publish
from monolith.streams.reader import DeliveryGap, OrderedReader, last_message
from monolith.streams.state_store import StateStore

_LOGGER = logging.getLogger("monolith.joiner")
FETCH_BATCH = 512
MAX_BACKOFF = 5.0

# Sample headers: the position the sample was decided at.
SRC_SEQ, WIN_SEQ = "src-seq", "win-seq"
STATE_BUCKET = "JOINER_STATE"
SNAPSHOT_SECONDS = 2.0  # wall seconds between snapshots while events flow (restart cost, not correctness)


async def ensure_state_store(js: JetStream, replicas: int) -> None:
    """Creates the object store that holds the joins' snapshots, if missing."""
    await StateStore.ensure(js, STATE_BUCKET, "sample-joiner state, one object per partition", replicas)


def sample_message(partition: int, emitted: Emitted) -> Message:
    """The SAMPLES message of a decided sample, its position in the headers."""
    sample = emitted.sample
    return Message(
        samples_subject(partition),
        sample.SerializeToString(),
        sample_message_id(sample.request_id, sample.item_id),
        {SRC_SEQ: str(emitted.src_seq), WIN_SEQ: str(emitted.win_seq)},
    )


def sample_position(headers: Mapping[str, str] | None) -> tuple[int, int]:
    """(src_seq, win_seq) of a published sample, from its headers.

    Raises:
        ValueError: headers missing or malformed (not a sample this joiner wrote).
    """
    headers = headers or {}
    try:
        return int(headers[SRC_SEQ]), int(headers[WIN_SEQ])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"sample headers lack a valid position ({exc}): {headers}") from None


class PartitionReader:
    """Joins one partition until stopped, restarting itself after failures.

    Args:
        js: a JetStream context on a connection that reconnects by itself.
        partition: the partition index.
        config: the join's settings.
        streams: stream names and timeouts.
    """

    def __init__(self, js: JetStream, partition: int, config: JoinerConfig, streams: StreamsConfig) -> None:
        self.js = js
        self.partition = partition
        self.config = config
        self.streams = streams
        self.join: PartitionJoin | None = None
        self.published = 0
        self.restarts = 0
        self._counted_through = 0  # events at or before this sequence are re-reads: not counted again
        self._label = str(partition)
        self._snapshot_name = f"partition-{partition}"
        self._reading = False  # the current attempt got as far as reading events

    async def run(self, stop: asyncio.Event) -> None:
        """Joins until `stop` is set; failures restart from the last published sample."""
        backoff = 0.1
        failing = False
        while not stop.is_set():
            self._reading = False
            try:
                await self._join(stop)
                return
            except (*TRANSIENT_ERRORS, DeliveryGap) as exc:
                if self._reading:  # it had recovered and was reading: this is a new outage
                    failing, backoff = False, 0.1
                self.restarts += 1
                metrics.RESTARTS.labels(self._label).inc()
                if not failing:  # one warning per outage, not one per attempt
                    _LOGGER.warning("partition %d: %s; restarting from the last sample", self.partition, describe(exc))
                failing = True
                try:
                    await asyncio.wait_for(stop.wait(), backoff)
                except asyncio.TimeoutError:
                    pass
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _restore(self, store: StateStore) -> PartitionJoin:
        """The last snapshot of this partition's join, or a fresh join if there is none."""
        data = await store.get(self._snapshot_name)
        if data is None:
            return PartitionJoin(self.config)
        return PartitionJoin.restore(self.config, pb.JoinState.FromString(data))

    async def _last_published(self) -> tuple[int, int]:
        """The position of the last sample on `samples.<p>`; (0, 0) if none."""
        last = await last_message(self.js, SAMPLES_STREAM, samples_subject(self.partition))
        return (0, 0) if last is None else sample_position(last.headers)

    async def _join(self, stop: asyncio.Event) -> None:
        store = await StateStore.open(self.js, STATE_BUCKET)
        join = self.join = await self._restore(store)
        after = await self._last_published()
        events = await OrderedReader.open(self.js, EVENTS_STREAM, events_subject(self.partition), join.last_seq + 1)
        _LOGGER.info(
            "partition %d: reading events after sequence %d, publishing after %s",
            self.partition, join.last_seq, after,
        )  # fmt: skip
        saved_seq, saved_at = join.last_seq, time.monotonic()
        self._reading = True
        try:
            while not stop.is_set():
                # When caught up, ask for one message so the next event is joined at once.
                messages = await events.fetch(FETCH_BATCH if events.pending else 1, timeout=1.0)
                for message in messages:
                    for emitted in self._add(join, message.sequence, message.data):
                        if emitted.position > after:
                            await self._publish(emitted)
                            after = emitted.position
                metrics.CONSUMER_LAG.labels(self._label).set(events.pending)
                # Every sample of the events read so far is published: the state may be saved.
                if join.last_seq != saved_seq and (stop.is_set() or time.monotonic() - saved_at > SNAPSHOT_SECONDS):
                    await store.put(self._snapshot_name, join.snapshot().SerializeToString())
                    saved_seq, saved_at = join.last_seq, time.monotonic()
                    metrics.OPEN_WINDOWS.labels(self._label).set(join.open_windows)
        finally:
            await events.close()

    def _add(self, join: PartitionJoin, seq: int, data: bytes) -> list[Emitted]:
        before = Counter(join.counts)
        try:
            event = pb.Event.FromString(data)
            emitted = join.add(seq, event)
        except (DecodeError, ValueError) as exc:
            if seq > self._counted_through:
                metrics.BAD_EVENTS.labels(self._label).inc()
                _LOGGER.warning("partition %d: skipping event %d: %s", self.partition, seq, exc)
            emitted = []
        if seq > self._counted_through:
            self._counted_through = seq
            for name, count in (join.counts - before).items():
                metrics.EVENTS.labels(self._label, name).inc(count)
        return emitted

    async def _publish(self, emitted: Emitted) -> None:
        try:
            await publish(self.js, sample_message(self.partition, emitted), SAMPLES_STREAM, self.streams.timeout)
        except TRANSIENT_ERRORS:
            metrics.PUBLISH_FAILURES.labels(self._label).inc()
            raise
        self.published += 1
        metrics.SAMPLES.labels(self._label, "positive" if emitted.sample.label else "negative").inc()
