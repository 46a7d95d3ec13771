"""The replay's side of the streams: closing the joiner's windows, reading SAMPLES back.

The joiner closes windows on a per-partition watermark derived from event time, never the
wall clock, so once the replay's last event is in, the impressions of its last hour (the
window) would wait forever for more traffic. The replay ends the way more traffic would:
one more impression per partition (`watermark_request_ids`), far enough ahead in event time
that every window of the replay closes. Those impressions are the replay's own and left out
of every count (their windows stay open).

`SampleLog` reads SAMPLES from the start with an ordered consumer (no state on the server
beyond the subscription) and keeps the samples whose request_id carries this run's prefix,
so earlier runs on the same stack do not count.

`ImpressionWatch` tells when an impression is stored on EVENTS. model-serving publishes
impressions asynchronously after Predict returns, while ReportActions stores an action
before it returns; the replay's window gate (`pacing.WindowGate`) lets an event go only
once the events it could overtake have both on the stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Callable

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from monolith.api.joiner.v1 import joiner_pb2
from monolith.harness.replay.bookkeeping import SampleKey
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig, partition_of
from monolith.streams.jetstream import BackgroundLoop, connect

_LOGGER = logging.getLogger("monolith.harness.replay.samples")
TIMEOUT = 10.0  # seconds for one stream request
MSG_ID = "Nats-Msg-Id"
IMPRESSION_MSG_ID = "imp/"  # serving's message ids: imp/<request_id>/<item_id>


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
        self._config = config
        self._prefix = prefix
        self._loop = BackgroundLoop("replay-samples")
        self._lock = threading.Lock()
        self._samples: list[tuple[SampleKey, float]] = []
        self._positives = 0
        self._sequence = 0  # the newest stream sequence delivered
        self._nc = None
        self._js = None

    def start(self) -> None:
        """Connects and subscribes (from the first message of the stream).

        Raises:
            Unavailable: NATS did not answer.
        """
        self._loop.run(self._start(), TIMEOUT * 3)

    async def _start(self) -> None:
        self._nc = await connect(self._config, "monolith-replay", attempts=10)
        self._js = self._nc.jetstream(timeout=TIMEOUT)
        await self._js.subscribe(
            "samples.*", stream=SAMPLES_STREAM, cb=self._on_message, ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )  # fmt: skip

    async def _on_message(self, msg: Msg) -> None:
        sample = joiner_pb2.Sample.FromString(msg.data)
        with self._lock:
            self._sequence = max(self._sequence, msg.metadata.sequence.stream)
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
        return self._loop.run(self._caught_up(), TIMEOUT)

    async def _caught_up(self) -> bool:
        info = await self._js.stream_info(SAMPLES_STREAM)
        with self._lock:
            return self._sequence >= info.state.last_seq

    def events_stored(self) -> int:
        """Messages on EVENTS now (impressions and actions of earlier traffic)."""
        return self._loop.run(self._events_stored(), TIMEOUT)

    async def _events_stored(self) -> int:
        info = await self._js.stream_info(EVENTS_STREAM)
        return int(info.state.messages)

    def consumer_lag(self, durable: str) -> int | None:
        """Samples the durable consumer (the online trainers) has not acknowledged; None if unknown."""
        try:
            return self._loop.run(self._consumer_lag(durable), TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a figure for the progress line only
            _LOGGER.debug("consumer lag of %s unknown: %s", durable, exc)
            return None

    async def _consumer_lag(self, durable: str) -> int:
        info = await self._js.consumer_info(SAMPLES_STREAM, durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    def close(self) -> None:
        if self._nc is not None:
            try:
                self._loop.run(self._nc.close(), TIMEOUT)
            except (TimeoutError, asyncio.CancelledError, Exception) as exc:  # noqa: BLE001 - closing anyway
                _LOGGER.debug("closing NATS: %s", exc)
        self._loop.close()


class ImpressionWatch:
    """Which of this run's impressions are stored on EVENTS, from the message ids alone.

    A headers-only ordered consumer of EVENTS from the moment it starts: no payload is
    sent, the `Nats-Msg-Id` header names the impression (`imp/<request_id>/<item_id>`).

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
        self._marker = f"{IMPRESSION_MSG_ID}{prefix}"
        self.timeout = timeout
        self._clock = clock
        self._loop: BackgroundLoop | None = None
        self._nc = None
        self._lock = threading.Lock()
        self._stored: set[str] = set()
        self._waiting: dict[str, list[tuple[float, Callable[[], None]]]] = {}
        self.unseen = 0

    def start(self) -> None:
        """Subscribes (new messages only).

        Raises:
            Unavailable: NATS did not answer.
        """
        self._loop = BackgroundLoop("replay-impressions")
        self._loop.run(self._start(), TIMEOUT * 3)

    async def _start(self) -> None:
        self._nc = await connect(self._config, "monolith-replay-impressions", attempts=10)
        js = self._nc.jetstream(timeout=TIMEOUT)
        await js.subscribe(
            "events.*", stream=EVENTS_STREAM, cb=self._on_message, ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW, headers_only=True,
        )  # fmt: skip

    async def _on_message(self, msg: Msg) -> None:
        msg_id = (msg.headers or {}).get(MSG_ID, "")
        if msg_id.startswith(self._marker):
            self.stored(msg_id[len(IMPRESSION_MSG_ID) :].rsplit("/", 1)[0])

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
        if self._loop is not None:
            if self._nc is not None:
                try:
                    self._loop.run(self._nc.close(), TIMEOUT)
                except (TimeoutError, asyncio.CancelledError, Exception) as exc:  # noqa: BLE001 - closing anyway
                    _LOGGER.debug("closing NATS: %s", exc)
            self._loop.close()
        with self._lock:
            due = [callback for waiting in self._waiting.values() for _, callback in waiting]
            self._waiting.clear()
        for callback in due:
            callback()
