"""Joining one partition on JetStream: read `events.<p>` in order, publish `samples.<p>`.

Exactly once without acknowledgements (STREAMS.md): the join is a deterministic function
of the partition's events (see window), and every sample carries where it came from and
where to restart. On start, and after any failure (a lost connection, a publish with no
answer, a gap in delivery), the reader reads the last sample of its partition, re-reads
the events from that sample's restart point, and publishes only the samples after it. So
a SIGKILL at any moment loses nothing and duplicates nothing; the `Nats-Msg-Id` header is
a second guard, not the mechanism.

Samples are published one at a time, each waiting for its acknowledgement: a later sample
must never be stored while an earlier one is not, or the restart would skip the gap.
Partitions run concurrently, so throughput comes from their number.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections import Counter

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.joiner import metrics
from monolith.joiner.config import JoinerConfig
from monolith.joiner.window import Emitted, PartitionJoin
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, events_subject, samples_subject
from monolith.streams.jetstream import TRANSIENT_ERRORS

_LOGGER = logging.getLogger("monolith.joiner")
FETCH_BATCH = 512
MAX_BACKOFF = 5.0

# Sample headers: where the sample comes from and where a restart re-reads from.
SRC_SEQ, WIN_SEQ, FROM_SEQ, FROM_TIME = "src-seq", "win-seq", "from-seq", "from-time"


class DeliveryGap(RuntimeError):
    """The consumer skipped a message (lost in flight): re-read from the last sample."""


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a partition's join restarts: read from `from_seq`, publish after `after`."""

    from_seq: int = 1
    from_time: float = -math.inf
    after: tuple[int, int] = (0, 0)


def sample_headers(emitted: Emitted) -> dict[str, str]:
    sample = emitted.sample
    return {
        "Nats-Msg-Id": f"smp/{sample.request_id}/{sample.item_id}",
        SRC_SEQ: str(emitted.src_seq),
        WIN_SEQ: str(emitted.win_seq),
        FROM_SEQ: str(emitted.from_seq),
        FROM_TIME: repr(emitted.from_time),
    }


def resume_point(headers: dict[str, str] | None) -> ResumePoint:
    """The restart point a published sample's headers describe.

    Raises:
        ValueError: headers missing or malformed (not a sample this joiner wrote).
    """
    headers = headers or {}
    try:
        return ResumePoint(
            from_seq=int(headers[FROM_SEQ]),
            from_time=float(headers[FROM_TIME]),
            after=(int(headers[SRC_SEQ]), int(headers[WIN_SEQ])),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"sample headers lack a valid restart point ({exc}): {headers}") from None


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

    async def resume_point(self) -> ResumePoint:
        """From the last sample of the partition (or the start of the stream if none)."""
        try:
            last = await self.js.get_last_msg(SAMPLES_STREAM, samples_subject(self.partition))
        except nats.js.errors.NotFoundError:
            return ResumePoint()
        return resume_point(last.headers)

    async def _join(self, stop: asyncio.Event) -> None:
        resume = await self.resume_point()
        join = self.join = PartitionJoin(self.config, newest_time=resume.from_time)
        after = resume.after
        subscription = await self.js.pull_subscribe(
            events_subject(self.partition),
            durable=None,
            stream=EVENTS_STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=resume.from_seq,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
            ),
        )
        _LOGGER.info(
            "partition %d: reading events from sequence %d, publishing after %s",
            self.partition, resume.from_seq, after,
        )  # fmt: skip
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
                    continue
                for message in messages:
                    meta = message.metadata
                    delivered += 1
                    if meta.sequence.consumer != delivered:
                        raise DeliveryGap(f"delivery {meta.sequence.consumer} arrived, expected {delivered}")
                    seq = meta.sequence.stream
                    for emitted in self._add(join, seq, message.data):
                        if emitted.position > after:
                            await self._publish(emitted)
                            after = emitted.position
                    if stop.is_set():
                        break
                if messages:
                    pending = messages[-1].metadata.num_pending
                    metrics.CONSUMER_LAG.labels(self._label).set(pending)
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
