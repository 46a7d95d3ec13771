"""The replay's side of the streams: closing the joiner's windows, reading SAMPLES back.

The joiner closes windows on a per-partition watermark derived from event time, never the
wall clock, so once the replay's last event is in, the impressions of its last hour (the
window) would wait forever for more traffic. The replay ends the way more traffic would:
one more impression per partition (`watermark_request_ids`), far enough ahead in event time
that every window of the replay closes. Those impressions are the replay's own and left out
of every count (their windows stay open).

`SampleLog` follows SAMPLES from the start (`monolith.streams.watch`: an ordered consumer,
no state on the server beyond the subscription) and keeps the samples whose request_id
carries this run's prefix, so earlier runs on the same stack do not count.

`ImpressionWatch` tells when an impression is stored on EVENTS, from the message ids
alone (`monolith.streams.ids` reads the request_id back from an `imp/` or `imps/` id: one
impression, or a Predict call's candidates in one message). model-serving publishes
impressions asynchronously after Predict returns, while ReportActions stores an action
before it returns; the replay's window gate (`pacing.WindowGate`) lets an event go only
once the events it could overtake have both on the stream.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable

from monolith.api.joiner.v1 import joiner_pb2
from monolith.harness.replay.bookkeeping import SampleKey
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, partition_of
from monolith.streams.ids import IMPRESSION, IMPRESSIONS, parse_message_id
from monolith.streams.publish import MSG_ID_HEADER
from monolith.streams.reader import StoredMessage
from monolith.streams.watch import StreamWatch

_LOGGER = logging.getLogger("monolith.harness.replay.samples")
TIMEOUT = 10.0  # seconds for one stream request


def watermark_request_ids(prefix: str, partitions: int) -> list[str]:
    """One request_id per partition (index = partition), each `<prefix><p>-<k>` for the first k that lands there."""
    ids = []
    for p in range(partitions):
        ids.append(next(f"{prefix}{p}-{k}" for k in itertools.count() if partition_of(f"{prefix}{p}-{k}", partitions) == p))
    return ids


def closing_time(last_event_time: float, window: float, lateness: float) -> float:
    """An event time whose watermark closes every window opened at or before `last_event_time`.

    A window closes when the watermark (newest event time - lateness) passes the
    impression's time + window.
    """
    return last_event_time + window + lateness + 1.0


class SampleLog:
    """This run's samples on SAMPLES, read from the stream's start as they arrive.

    Args:
        config: where NATS is.
        prefix: the request_id prefix of this run's impressions.
    """

    def __init__(self, config: StreamsConfig, prefix: str) -> None:
        self._prefix = prefix
        self._watch = StreamWatch(config, "monolith-replay", TIMEOUT)
        self._lock = threading.Lock()
        self._samples: list[tuple[SampleKey, float]] = []
        self._positives = 0
        self._sequence = 0  # the newest stream sequence delivered

    def start(self) -> None:
        """Connects and subscribes (from the first message of the stream).

        Raises:
            Unavailable: NATS did not answer.
        """
        self._watch.follow(SAMPLES_STREAM, "samples.*", self._on_message, from_start=True)

    def _on_message(self, message: StoredMessage) -> None:
        sample = joiner_pb2.Sample.FromString(message.data)
        with self._lock:
            self._sequence = max(self._sequence, message.sequence)
            if sample.request_id.startswith(self._prefix):
                self._samples.append(((sample.request_id, sample.item_id), sample.label))
                self._positives += sample.label >= 0.5

    def samples(self) -> list[tuple[SampleKey, float]]:
        """(key, label) of this run's samples so far, in stream order."""
        with self._lock:
            return list(self._samples)

    def counts(self) -> tuple[int, int]:
        """(samples of this run so far, of which positive)."""
        with self._lock:
            return len(self._samples), self._positives

    def caught_up(self) -> bool:
        """Whether every message the stream holds now has been read."""
        last = self._watch.stream_state(SAMPLES_STREAM).last_sequence
        with self._lock:
            return self._sequence >= last

    def events_stored(self) -> int:
        """Messages on EVENTS now (impressions and actions of earlier traffic)."""
        return self._watch.stream_state(EVENTS_STREAM).messages

    def consumer_lag(self, durable: str) -> int | None:
        """Samples the durable consumer (the online trainers) has not acknowledged; None if unknown."""
        try:
            state = self._watch.consumer_state(SAMPLES_STREAM, durable)
        except Exception as exc:  # noqa: BLE001 - a figure for the progress line only
            _LOGGER.debug("consumer lag of %s unknown: %s", durable, exc)
            return None
        return None if state is None else state.pending + state.ack_pending

    def close(self) -> None:
        self._watch.close()


class ImpressionWatch:
    """Which of this run's impressions are stored on EVENTS, from the message ids alone.

    A headers-only ordered consumer of EVENTS from the moment it starts: no payload is
    sent, the `Nats-Msg-Id` header names the request_id (`streams.ids.impression_message_id`,
    `impressions_message_id`).

    Args:
        config: where NATS is.
        prefix: the request_id prefix of this run's impressions.
        timeout: seconds after which a callback waiting for an impression runs anyway (the
            impression was dropped by serving, say); counted in `unseen`.
        clock: monotonic seconds.
    """

    def __init__(self, config: StreamsConfig, prefix: str, timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._config = config
        self._prefix = prefix
        self.timeout = timeout
        self._clock = clock
        self._watch: StreamWatch | None = None
        self._lock = threading.Lock()
        self._stored: set[str] = set()
        self._waiting: dict[str, list[tuple[float, Callable[[], None]]]] = {}
        self.unseen = 0

    def start(self) -> None:
        """Subscribes (new messages only).

        Raises:
            Unavailable: NATS did not answer.
        """
        self._watch = StreamWatch(self._config, "monolith-replay-impressions", TIMEOUT)
        self._watch.follow(EVENTS_STREAM, "events.*", self._on_message, from_start=False, headers_only=True)

    def _on_message(self, message: StoredMessage) -> None:
        key = parse_message_id(message.headers.get(MSG_ID_HEADER, ""))
        if key is not None and key.kind in (IMPRESSION, IMPRESSIONS) and key.request_id.startswith(self._prefix):
            self.stored(key.request_id)

    def stored(self, request_id: str) -> None:
        """Records that the impression of `request_id` is on the stream; runs what waited for it."""
        with self._lock:
            self._stored.add(request_id)
            callbacks = self._waiting.pop(request_id, [])
        for _, callback in callbacks:
            callback()

    def after_stored(self, request_id: str, callback: Callable[[], None]) -> None:
        """Runs `callback` once the impression of `request_id` is on the stream (at once if it is)."""
        with self._lock:
            if request_id not in self._stored:
                self._waiting.setdefault(request_id, []).append((self._clock(), callback))
                return
        callback()

    def expire(self) -> int:
        """Runs the callbacks that waited longer than `timeout`; returns how many impressions gave up."""
        cutoff = self._clock() - self.timeout
        due: list[Callable[[], None]] = []
        with self._lock:
            for request_id, waiting in list(self._waiting.items()):
                if waiting[0][0] <= cutoff:
                    del self._waiting[request_id]
                    due += [callback for _, callback in waiting]
                    self.unseen += 1
        for callback in due:
            callback()
        return len(due)

    def close(self) -> None:
        """Unsubscribes; callbacks still waiting run now."""
        if self._watch is not None:
            self._watch.close()
        with self._lock:
            due = [callback for waiting in self._waiting.values() for _, callback in waiting]
            self._waiting.clear()
        for callback in due:
            callback()
