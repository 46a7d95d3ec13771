"""Joining one partition on JetStream: read `events.<p>` in order, publish `samples.<p>`.

Exactly once without acknowledgements (after STREAMS.md), with samples published in
batches, many in flight:
- The join is a deterministic function of the partition's events (see window), and every
  sample carries the position it was decided at (headers `src-seq`, `win-seq`, `win-idx`),
  unique per sample.
- The reader fetches a batch of events, joins them, publishes every sample they decide at
  once (rounds of up to `PUBLISH_ROUND` in flight) and awaits every acknowledgement. If one
  is missing, it restarts (below); else it reads on.
- Now and then, between batches, it saves the join (see snapshots) with `samples_seq`: the
  SAMPLES sequence of the last message on `samples.<p>` then. It does so only when (a)
  every sample decided by the events read is acknowledged, and (b) every sample it found
  stored at its restart (below) came from an event at or before the last one read. Then
  every sample of the events up to the snapshot's `last_seq` is stored, and every sample
  stored at or before `samples_seq` came from those events: (a) and (b) cover what this
  reader stored and found, the previous snapshot (by induction) what was stored before.
- Restart (on start, and after any failure: a lost connection, a missing acknowledgement,
  a gap in delivery): load the last snapshot, read the positions of the samples on
  `samples.<p>` after its `samples_seq` (headers only: O(rate x snapshot interval)
  messages; all of them if nothing is saved), re-read the events after its `last_seq`, and
  publish each sample decided whose position is not among those read. The samples of
  events up to `last_seq` are stored (a); a sample of a later event, if stored, is stored
  after `samples_seq` (b), so the positions read are exactly those stored: none is
  published twice, and one that failed in a batch whose others were stored (a gap) is
  published now.
So a SIGKILL at any moment loses nothing and duplicates nothing. The order on the stream is
the join's, except that a sample filling a gap comes after the samples stored past it.

What this relies on: one reader per partition (replicas own disjoint partitions), and a
message sent before a restart is stored, if ever, before the restart reads `samples.<p>`
(so for a killed process: its connection is closed seconds before a new one reads). A
publish that sat in the server's queue past that read would be published again; the
`Nats-Msg-Id` header drops that copy within the stream's duplicate window, as a second
guard. EVENTS must keep the events since the last snapshot.

Snapshots of earlier releases carry no `samples_seq`: those releases published one sample
at a time, so nothing after the last sample of `samples.<p>` was stored; the reader resumes
after that sample's position (a missing `win-idx` is 0), until its first snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from google.protobuf.message import DecodeError

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.common.errors import describe
from monolith.common.failpoints import failpoint
from monolith.joiner import metrics
from monolith.joiner.config import JoinerConfig
from monolith.joiner.quality import ServedQuality
from monolith.joiner.snapshots import Snapshots
from monolith.joiner.window import Emitted, PartitionJoin, Position
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, events_subject, samples_subject
from monolith.streams.ids import sample_message_id
from monolith.streams.jetstream import TRANSIENT_ERRORS, JetStream
from monolith.streams.publish import Message, publish_round
from monolith.streams.reader import DeliveryGap, OrderedReader, last_message
from monolith.streams.state_store import StateStore

_LOGGER = logging.getLogger("monolith.joiner")
FETCH_BATCH = 512
PUBLISH_ROUND = 1000  # samples in flight at once (under the client's async-publish limit)
SCAN_BATCH = 1000
MAX_BACKOFF = 5.0

# Sample headers: the position the sample was decided at.
SRC_SEQ, WIN_SEQ, WIN_IDX = "src-seq", "win-seq", "win-idx"
NO_POSITION: Position = (0, 0, 0)
STATE_BUCKET = "JOINER_STATE"
SNAPSHOT_SECONDS = 2.0  # wall seconds between snapshots while events flow (restart cost, not correctness)


class PublishFailed(RuntimeError):
    """Some samples of a batch were not acknowledged: restart and repair from what is stored."""


async def ensure_state_store(js: JetStream, replicas: int) -> None:
    """Creates the object store that holds the joins' snapshots, if missing."""
    await StateStore.ensure(js, STATE_BUCKET, "sample-joiner state: a base and deltas per partition", replicas)


def sample_message(partition: int, emitted: Emitted) -> Message:
    """The SAMPLES message of a decided sample, its position in the headers."""
    return Message(
        samples_subject(partition),
        emitted.data,
        sample_message_id(emitted.request_id, emitted.item_id),
        {SRC_SEQ: str(emitted.src_seq), WIN_SEQ: str(emitted.win_seq), WIN_IDX: str(emitted.win_idx)},
    )


def sample_position(headers: Mapping[str, str] | None) -> Position:
    """(src_seq, win_seq, win_idx) of a published sample, from its headers (no `win-idx`: 0).

    Raises:
        ValueError: headers missing or malformed (not a sample this joiner wrote).
    """
    headers = headers or {}
    try:
        return int(headers[SRC_SEQ]), int(headers[WIN_SEQ]), int(headers.get(WIN_IDX, 0))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"sample headers lack a valid position ({exc}): {headers}") from None


class StoredSamples:
    """What a restarted reader found stored: the samples it must not publish again.

    Args:
        positions: positions of the samples on `samples.<p>` after the snapshot's `samples_seq`.
        after: every position up to this one is stored too (a snapshot of a release that
            published one sample at a time: the last sample's position).
    """

    def __init__(self, positions: Iterable[Position] = (), after: Position = NO_POSITION) -> None:
        self._positions = set(positions)
        self._after = after
        # The last event that decided a stored sample.
        self._through = max([after[0], *(src_seq for src_seq, _, _ in self._positions)])

    def unpublished(self, emitted: Sequence[Emitted]) -> list[Emitted]:
        """Those of `emitted` not stored yet, in order."""
        return [e for e in emitted if e.position > self._after and e.position not in self._positions]

    def settled(self, last_seq: int) -> bool:
        """Whether every sample found stored comes from an event at or before `last_seq`.

        Once it does, the positions are no longer needed: later events decide none of them.
        """
        if last_seq < self._through:
            return False
        self._positions.clear()
        return True


class PartitionReader:
    """Joins one partition until stopped, restarting itself after failures.

    Args:
        js: a JetStream context on a connection that reconnects by itself.
        partition: the partition index.
        config: the join's settings.
        streams: stream names and timeouts.
        quality: where the samples published are recorded (their served scores and labels).
    """

    def __init__(self, js: JetStream, partition: int, config: JoinerConfig, streams: StreamsConfig,
                 quality: ServedQuality | None = None) -> None:  # fmt: skip
        self.js = js
        self.quality = quality
        self.partition = partition
        self.config = config
        self.streams = streams
        self.join: PartitionJoin | None = None
        self.published = 0
        self.restarts = 0
        self._counted_through = 0  # events at or before this sequence are re-reads: not counted again
        self._label = str(partition)
        self._subject = samples_subject(partition)
        self._reading = False  # the current attempt got as far as reading events

    async def run(self, stop: asyncio.Event) -> None:
        """Joins until `stop` is set; failures restart from the last snapshot."""
        backoff = 0.1
        failing = False
        while not stop.is_set():
            self._reading = False
            try:
                await self._join(stop)
                return
            except (*TRANSIENT_ERRORS, DeliveryGap, PublishFailed) as exc:
                if self._reading:  # it had recovered and was reading: this is a new outage
                    failing, backoff = False, 0.1
                self.restarts += 1
                metrics.RESTARTS.labels(self._label).inc()
                if not failing:  # one warning per outage, not one per attempt
                    _LOGGER.warning("partition %d: %s; restarting from its snapshot", self.partition, describe(exc))
                failing = True
                try:
                    await asyncio.wait_for(stop.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _stored(self, samples_seq: int | None) -> StoredSamples:
        """The samples on `samples.<p>` that a restart from a snapshot with `samples_seq` must not publish."""
        if samples_seq is None:  # a snapshot of a release that published one at a time
            last = await last_message(self.js, SAMPLES_STREAM, self._subject)
            return StoredSamples(after=NO_POSITION if last is None else sample_position(last.headers))
        reader = await OrderedReader.open(self.js, SAMPLES_STREAM, self._subject, samples_seq + 1, headers_only=True)
        positions = []
        try:
            remaining = reader.pending
            while remaining > 0:
                messages = await reader.fetch(min(SCAN_BATCH, remaining), timeout=self.streams.timeout)
                if not messages:
                    raise TimeoutError(f"{remaining} samples after sequence {samples_seq} did not arrive")
                remaining -= len(messages)
                for message in messages:
                    try:
                        positions.append(sample_position(message.headers))
                    except ValueError as exc:  # not a sample of this joiner: nothing to re-decide
                        _LOGGER.warning("partition %d: sample %d: %s", self.partition, message.sequence, exc)
        finally:
            await reader.close(drop=True)
        return StoredSamples(positions)

    async def _join(self, stop: asyncio.Event) -> None:
        snapshots = Snapshots(await StateStore.open(self.js, STATE_BUCKET), self.partition)
        join, samples_seq = await snapshots.load(self.config)
        self.join = join
        stored = await self._stored(samples_seq)
        events = await OrderedReader.open(self.js, EVENTS_STREAM, events_subject(self.partition), join.last_seq + 1)
        _LOGGER.info(
            "partition %d: reading events after sequence %d, samples after sequence %s are checked",
            self.partition, join.last_seq, samples_seq,
        )  # fmt: skip
        saved_seq, saved_at = join.last_seq, time.monotonic()
        self._reading = True
        try:
            while not stop.is_set():
                # When caught up, ask for one message so the next event is joined at once.
                messages = await events.fetch(FETCH_BATCH if events.pending else 1, timeout=1.0)
                emitted = [e for message in messages for e in self._add(join, message.sequence, message.data)]
                await self._publish(stored.unpublished(emitted))
                metrics.CONSUMER_LAG.labels(self._label).set(events.pending)
                # Every sample of the events read so far is stored: the state may be saved.
                due = stop.is_set() or time.monotonic() - saved_at > SNAPSHOT_SECONDS
                if join.last_seq != saved_seq and due and stored.settled(join.last_seq):
                    last = await last_message(self.js, SAMPLES_STREAM, self._subject)
                    await snapshots.save(join, 0 if last is None else last.sequence)
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

    async def _publish(self, emitted: Sequence[Emitted]) -> None:
        """Publishes the samples, many in flight, and returns once every one is acknowledged.

        Raises:
            PublishFailed: some were not (others may be stored: the restart repairs the gaps).
        """
        for start in range(0, len(emitted), PUBLISH_ROUND):
            batch = emitted[start : start + PUBLISH_ROUND]
            messages = [sample_message(self.partition, e) for e in batch]
            failed = (await publish_round(self.js, messages, SAMPLES_STREAM, self.streams.timeout)).failed
            if failed:
                metrics.PUBLISH_FAILURES.labels(self._label).inc(len(failed))
                raise PublishFailed(f"{len(failed)} of {len(messages)} samples not acknowledged")
            self.published += len(batch)
            self._record(batch)
            failpoint("joiner.round_published")  # tests crash here with other partitions' rounds in flight

    def _record(self, published: Sequence[Emitted]) -> None:
        """Counts published samples, their label delays, and their scores for the quality figures."""
        delays = [e.label_delay for e in published if e.label]
        metrics.SAMPLES.labels(self._label, "positive").inc(len(delays))
        metrics.SAMPLES.labels(self._label, "negative").inc(len(published) - len(delays))
        for delay in delays:
            metrics.LABEL_DELAY.observe(delay)
        if self.quality is not None:
            self.quality.add([e.score for e in published], [e.label for e in published],
                             [e.sample_rate for e in published])  # fmt: skip
