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

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ObjectStoreConfig, StorageType

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.joiner import metrics
from monolith.joiner.config import JoinerConfig
from monolith.joiner.window import Emitted, PartitionJoin
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, events_subject, samples_subject
from monolith.streams.jetstream import TRANSIENT_ERRORS

_LOGGER = logging.getLogger("monolith.joiner")
FETCH_BATCH = 512
MAX_BACKOFF = 5.0

# Sample headers: the position the sample was decided at.
SRC_SEQ, WIN_SEQ = "src-seq", "win-seq"
STATE_BUCKET = "JOINER_STATE"
SNAPSHOT_SECONDS = 2.0  # wall seconds between snapshots while events flow (restart cost, not correctness)


async def ensure_state_store(js: JetStreamContext, replicas: int) -> None:
    """Creates the object store that holds the joins' snapshots, if missing."""
    try:
        await js.object_store(STATE_BUCKET)
    except nats.js.errors.NotFoundError:
        await js.create_object_store(
            STATE_BUCKET, config=ObjectStoreConfig(description="sample-joiner state, one object per partition",
                                                   replicas=replicas, storage=StorageType.FILE),  # fmt: skip
        )


class DeliveryGap(RuntimeError):
    """The consumer skipped a message (lost in flight): re-read from the last sample."""


def sample_headers(emitted: Emitted) -> dict[str, str]:
    sample = emitted.sample
    return {
        "Nats-Msg-Id": f"smp/{sample.request_id}/{sample.item_id}",
        SRC_SEQ: str(emitted.src_seq),
        WIN_SEQ: str(emitted.win_seq),
    }


def sample_position(headers: dict[str, str] | None) -> tuple[int, int]:
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

    def __init__(self, js: JetStreamContext, partition: int, config: JoinerConfig, streams: StreamsConfig) -> None:
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

    async def run(self, stop: asyncio.Event) -> None:
        """Joins until `stop` is set; failures restart from the last published sample."""
        backoff = 0.1
        failing = False
        while not stop.is_set():
            try:
                await self._join(stop)
                return
            except (*TRANSIENT_ERRORS, DeliveryGap) as exc:
                self.restarts += 1
                metrics.RESTARTS.labels(self._label).inc()
                if not failing:
                    _LOGGER.warning("partition %d: %s; restarting from the last sample", self.partition, _describe(exc))
                failing = True
                try:
                    await asyncio.wait_for(stop.wait(), backoff)
                except asyncio.TimeoutError:
                    pass
                backoff = min(backoff * 2, MAX_BACKOFF)
            else:
                failing, backoff = False, 0.1

    async def _restore(self, store: ObjectStore) -> PartitionJoin:
        """The last snapshot of this partition's join, or a fresh join if there is none."""
        try:
            data = (await store.get(self._snapshot_name)).data
        except nats.js.errors.ObjectNotFoundError:
            return PartitionJoin(self.config)
        return PartitionJoin.restore(self.config, pb.JoinState.FromString(data or b""))

    async def _last_published(self) -> tuple[int, int]:
        """The position of the last sample on `samples.<p>`; (0, 0) if none."""
        try:
            last = await self.js.get_last_msg(SAMPLES_STREAM, samples_subject(self.partition))
        except nats.js.errors.NotFoundError:
            return (0, 0)
        return sample_position(last.headers)

    async def _join(self, stop: asyncio.Event) -> None:
        store = await self.js.object_store(STATE_BUCKET)
        join = self.join = await self._restore(store)
        after = await self._last_published()
        subscription = await self.js.pull_subscribe(
            events_subject(self.partition),
            durable=None,
            stream=EVENTS_STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=join.last_seq + 1,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
            ),
        )
        _LOGGER.info(
            "partition %d: reading events after sequence %d, publishing after %s",
            self.partition, join.last_seq, after,
        )  # fmt: skip
        saved_seq, saved_at = join.last_seq, time.monotonic()
        try:
            delivered = 0
            pending = 0
            while not stop.is_set():
                try:
                    # A fetch that finds nothing waits for its whole batch (or the timeout):
                    # when caught up, ask for one message so the next event is joined at once.
                    messages = await subscription.fetch(FETCH_BATCH if pending else 1, timeout=1.0)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):  # nothing new within the second
                    metrics.CONSUMER_LAG.labels(self._label).set(0)
                    messages = []
                for message in messages:
                    meta = message.metadata
                    delivered += 1
                    if meta.sequence.consumer != delivered:
                        raise DeliveryGap(f"delivery {meta.sequence.consumer} arrived, expected {delivered}")
                    for emitted in self._add(join, meta.sequence.stream, message.data):
                        if emitted.position > after:
                            await self._publish(emitted)
                            after = emitted.position
                if messages:
                    pending = messages[-1].metadata.num_pending
                    metrics.CONSUMER_LAG.labels(self._label).set(pending)
                # Every sample of the events read so far is published: the state may be saved.
                if join.last_seq != saved_seq and (stop.is_set() or time.monotonic() - saved_at > SNAPSHOT_SECONDS):
                    await store.put(self._snapshot_name, join.snapshot().SerializeToString())
                    saved_seq, saved_at = join.last_seq, time.monotonic()
                    metrics.OPEN_WINDOWS.labels(self._label).set(join.open_windows)
        finally:
            try:
                await subscription.unsubscribe()
            except TRANSIENT_ERRORS:
                pass  # the server drops the consumer after its inactive threshold

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
            await self.js.publish(
                samples_subject(self.partition),
                emitted.sample.SerializeToString(),
                timeout=self.streams.timeout,
                stream=SAMPLES_STREAM,
                headers=sample_headers(emitted),
            )
        except TRANSIENT_ERRORS:
            metrics.PUBLISH_FAILURES.labels(self._label).inc()
            raise
        self.published += 1
        metrics.SAMPLES.labels(self._label, "positive" if emitted.sample.label else "negative").inc()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
