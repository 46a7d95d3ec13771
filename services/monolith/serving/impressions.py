"""Impressions: what model-serving showed, published to JetStream for the sample-joiner.

A Predict call that carries a `request_id` logs one impression per candidate: the
request_id, the candidate's item id (the value of the model's item feature), the raw
feature values the model scored (as the text `monolith.data.feature_ids` hashes, so ids
computed from a training sample equal the ids serving computed), the event time, the
dense version and the served probability.

The ids are checked before the call is scored (`request_keys`): every request_id and the
item id of every candidate that would be logged must pass the one id rule of
`monolith.streams.ids` (bounded UTF-8, no control characters), or the call is
INVALID_ARGUMENT and nothing is logged; ids end up in stream headers and samples.

Logging never slows or fails Predict. The call hands its scored request to a bounded
queue without blocking (`ImpressionLog.log`); a background asyncio loop builds the
messages and publishes them to `events.<partition of the request_id>`. A call is one
`Event(impressions=...)` message per request_id (normally one): the features sent once for
the call once, each candidate's item id, score and own features after them; the joiner
expands it into one impression per candidate. Its message id
`imps/<request_id>/<digest of the item ids>` (`streams.ids.impressions_message_id`) lets
the stream drop a re-publish after a lost acknowledgement. While NATS is down the
publisher retries and the queue fills (bounded in impressions, i.e. candidates);
past its capacity impressions are dropped and counted, never waited for.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping

import numpy as np

from monolith.api.joiner.v1 import joiner_pb2
from monolith.common.errors import InvalidArgument
from monolith.serving.metrics import (
    IMPRESSION_PUBLISH_FAILURES,
    IMPRESSIONS_DROPPED,
    IMPRESSIONS_PUBLISHED,
    IMPRESSIONS_QUEUED,
)
from monolith.streams.config import EVENTS_STREAM, StreamsConfig, events_subject, partition_of
from monolith.streams.ids import first_id_problem, impressions_message_id
from monolith.streams.jetstream import TRANSIENT_ERRORS, BackgroundLoop, Connection, JetStream, connect, ensure_streams
from monolith.streams.publish import Message, publish_round

_LOGGER = logging.getLogger("monolith.serving.impressions")

REQUEST_ID = "request_id"
EVENT_TIME = "event_time"
DEFAULT_QUEUE = 10_000
_PUBLISH_CHUNK = 1024  # impressions taken off the queue and published (pipelined) together
_MAX_BACKOFF = 1.0  # seconds between retries while NATS is down: recover quickly once it is back

# --------------------------------------------------------------------------- request keys


@dataclasses.dataclass(frozen=True)
class RequestKeys:
    """What a Predict call says about itself, one entry per example.

    Attributes:
        request_ids: object [batch] of str; "" means the example has no request_id (no
            impression is logged for it).
        item_ids: the candidate of each example with a request_id (the first value of its
            item feature, as text; "" if it has none or the model names no item feature);
            "" means no impression either (counted as `no_item`).
        event_times: float64 [batch] seconds since the epoch, or None: the call sent no
            `event_time`, so impressions carry the serving clock at the call.
    """

    request_ids: np.ndarray
    item_ids: list[str]
    event_times: np.ndarray | None


def request_keys(
    request_id: np.ndarray | None, event_time: np.ndarray | None, items: tuple[str, np.ndarray] | None, batch: int
) -> RequestKeys | None:
    """Checks the optional `request_id` and `event_time` inputs, and the ids to be logged.

    `request_id` and `event_time` may each have shape [] or [1] (one value for every
    example) or [batch]. Every request_id and the item id of every example with a
    request_id must pass the id rule (`monolith.streams.ids`); "" in either means no
    impression for that example.

    Args:
        request_id: the `request_id` input as `decode_inputs` gives it (str, or ints taken
            as their text).
        event_time: the decoded `event_time` input (float64 seconds since the epoch).
        items: (name, input as `decode_inputs` gives it) of the model's item feature; None
            if the model has none.
        batch: the examples in the request.

    Returns:
        The keys broadcast to the batch; None if the call sent no request_id (nothing to log).

    Raises:
        InvalidArgument: a shape other than those, an event_time that is not finite or is
            negative, or an id that breaks the rule (`input '<name>': example <i>: ...`).
    """
    times = None
    if event_time is not None:
        times = _broadcast(event_time, EVENT_TIME, batch)
        bad = ~np.isfinite(times) | (times < 0)
        if bad.any():
            at = int(np.argmax(bad))
            raise InvalidArgument(
                f"input {EVENT_TIME!r}: seconds since the epoch must be finite and >= 0; example {at} has "
                f"{float(times[at])!r}"
            )
    if request_id is None:
        return None
    ids = _broadcast(request_id, REQUEST_ID, batch)
    if ids.dtype != object:
        ids = np.array([str(v) for v in ids.tolist()], dtype=object)  # int ids are their decimal text
    request_ids = ids.tolist()
    _check_ids(REQUEST_ID, request_ids)
    if items is None:
        item_ids = [""] * batch
    else:
        name, array = items
        rows = feature_texts(array)
        firsts = [row[0] if row else "" for row in (rows * batch if len(rows) == 1 else rows)]
        # Only the candidates that would be logged: an example without a request_id has none.
        item_ids = [item if request else "" for request, item in zip(request_ids, firsts)]
        if array.dtype.kind not in "iu":  # int ids are decimal digits, always within the rule
            _check_ids(name, item_ids)
    return RequestKeys(ids, item_ids, times)


def _check_ids(name: str, values: list[str]) -> None:
    """Raises InvalidArgument `input '<name>': example <i>: <what is wrong>` for the first bad id."""
    found = first_id_problem(values)
    if found is not None:
        raise InvalidArgument(f"input {name!r}: example {found[0]}: {found[1]}")


def _broadcast(array: np.ndarray, name: str, batch: int) -> np.ndarray:
    if array.ndim > 1 or (array.ndim == 1 and array.shape[0] not in (1, batch)):
        raise InvalidArgument(
            f"input {name!r}: expects shape [] or [1] (one value for the call) or [{batch}] (one per example), "
            f"got {list(array.shape)}"
        )
    flat = array.reshape(-1)
    return np.repeat(flat, batch) if flat.shape[0] == 1 and batch != 1 else flat


# --------------------------------------------------------------------------- impressions


@dataclasses.dataclass(frozen=True)
class ScoredRequest:
    """One scored Predict call, as handed to the impression log (built into impressions later).

    Attributes:
        keys: the call's request ids and event times.
        inputs: the feature inputs as decoded (outer size 1, broadcast, or batch).
        scores: float32 [batch] probabilities served.
        model_version: the dense parameter version that scored them.
        received_at: the serving clock at the call (the event time when the call sent none).
    """

    keys: RequestKeys
    inputs: Mapping[str, np.ndarray]
    scores: np.ndarray
    model_version: int
    received_at: float

    @property
    def batch(self) -> int:
        return int(self.scores.shape[0])


def feature_texts(array: np.ndarray) -> list[list[str]]:
    """Each row's values as the text `feature_ids` hashes (see `_flatten` in serving/model.py).

    Ints by their decimal digits, strings as is, bytes decoded as UTF-8; in a [rows, k]
    string tensor "" pads a row and is not a value.

    Returns:
        One list of texts per row (the outer dimension).
    """
    if array.dtype.kind == "S":
        array = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
    rows = array.tolist()
    if array.ndim == 1:
        return [[str(v)] for v in rows]
    if array.dtype.kind in "OU":
        return [[str(v) for v in row if v != ""] for row in rows]
    return [[str(v) for v in row] for row in rows]


@dataclasses.dataclass(frozen=True)
class ImpressionMessage:
    """One EVENTS message of a scored call and the impressions (candidates) it carries."""

    message: Message
    candidates: int


def impression_messages(scored: ScoredRequest, partitions: int, max_bytes: int | None = None) -> list[ImpressionMessage]:
    """The EVENTS messages of a scored call: one `Event(impressions=...)` per request_id.

    A call normally has one request_id, so it is one message: the features sent once for
    the call (outer size 1: the user's) once, then each candidate's item id, score and own
    features. Examples with an empty request_id or item id have no impression (see
    `ImpressionLog` for the counting). A message over `max_bytes` (payload and headers) is
    split into messages of fewer candidates; a candidate too large alone is left out (the
    caller counts the shortfall as too_large).

    Args:
        scored: the scored call.
        partitions: P, for the subject `events.<partition_of(request_id, P)>`.
        max_bytes: NATS's max payload; None: no bound.

    Returns:
        The messages, in the order of each request_id's first example.
    """
    texts = {name: feature_texts(array) for name, array in scored.inputs.items()}
    shared_texts = {name: rows[0] for name, rows in texts.items() if len(rows) == 1}
    own_texts = [(name, rows) for name, rows in texts.items() if len(rows) > 1]
    times = scored.keys.event_times
    scores = scored.scores.tolist()
    examples: dict[str, list[int]] = {}  # request_id -> its examples with an item, in order
    for i, (request_id, item_id) in enumerate(zip(scored.keys.request_ids.tolist(), scored.keys.item_ids)):
        if request_id and item_id:
            examples.setdefault(request_id, []).append(i)
    out: list[ImpressionMessage] = []
    for request_id, indices in examples.items():
        event_time = scored.received_at if times is None else float(times[indices[0]])
        message = joiner_pb2.Impressions(
            request_id=request_id, event_time=event_time, model_version=scored.model_version
        )
        for name, values in shared_texts.items():
            message.shared_features[name].values.extend(values)
        add = message.candidates.add
        for i in indices:
            candidate = add(item_id=scored.keys.item_ids[i], score=scores[i])
            if times is not None and times[i] != event_time:
                candidate.event_time = float(times[i])
            for name, rows in own_texts:
                candidate.features[name].values.extend(rows[i])
        subject = events_subject(partition_of(request_id, partitions))
        out.extend(_bounded(message, subject, max_bytes))
    return out


def _bounded(message: joiner_pb2.Impressions, subject: str, max_bytes: int | None) -> list[ImpressionMessage]:
    """`message` as one message, or split into halves until each fits in `max_bytes`."""
    payload = joiner_pb2.Event(impressions=message).SerializeToString()
    msg_id = impressions_message_id(message.request_id, [c.item_id for c in message.candidates])
    # Headers travel in the payload's budget too; 64 bytes cover the rest of them.
    if max_bytes is None or len(payload) + len(msg_id) + 64 <= max_bytes:
        return [ImpressionMessage(Message(subject, payload, msg_id), len(message.candidates))]
    if len(message.candidates) == 1:
        return []
    half = len(message.candidates) // 2
    parts = []
    for candidates in (message.candidates[:half], message.candidates[half:]):
        part = joiner_pb2.Impressions()
        part.CopyFrom(message)
        del part.candidates[:]
        part.candidates.extend(candidates)
        parts.extend(_bounded(part, subject, max_bytes))
    return parts


# --------------------------------------------------------------------------- the log


class ImpressionLog:
    """Publishes impressions of scored calls to JetStream in the background, bounded.

    `log` never blocks on NATS: it appends to a queue of at most `capacity` impressions
    (counting those in flight), or drops the call's impressions when that is full. A
    background loop connects (retrying forever), sets up the streams, and publishes what
    is queued, many messages in flight at once, retrying failed ones until they are stored.

    Args:
        streams: where NATS is and the number of partitions.
        capacity: impressions queued or in flight at most.
    """

    def __init__(self, streams: StreamsConfig, capacity: int = DEFAULT_QUEUE) -> None:
        if capacity < 1:
            raise ValueError(f"impression queue capacity must be >= 1, got {capacity}")
        self._streams = streams
        self._capacity = capacity
        self._lock = threading.Lock()
        self._queue: collections.deque[ScoredRequest] = collections.deque()
        self._queued = 0  # impressions in _queue plus those taken and not yet published
        self._closing = False
        self._idle = threading.Condition(self._lock)  # notified when _queued drops to 0
        self._publisher_waiting = False
        self._loop: BackgroundLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Future[None] | None = None
        self._nc: Connection | None = None

    def start(self) -> ImpressionLog:
        """Starts the background loop and the publisher (which connects on its own)."""
        self._loop = BackgroundLoop("impressions")
        self._wake = self._loop.run(self._make_event(), timeout=5.0)
        self._task = self._loop.submit(self._publish_forever())
        return self

    @staticmethod
    async def _make_event() -> asyncio.Event:
        return asyncio.Event()  # created on the loop it is awaited on

    def log(self, scored: ScoredRequest) -> None:
        """Queues a scored call's impressions; drops them (counted) if the queue is full. Never blocks."""
        count = scored.batch
        with self._lock:
            if self._closing:
                reason = "shutdown"
            elif self._queued + count > self._capacity:
                reason = "queue_full"
            else:
                reason = ""
                self._queue.append(scored)
                self._queued += count
                IMPRESSIONS_QUEUED.set(self._queued)
                wake, self._publisher_waiting = self._publisher_waiting, False
        if reason:
            IMPRESSIONS_DROPPED.labels(reason).inc(count)
            return
        if wake and self._loop is not None and self._wake is not None:
            self._loop.loop.call_soon_threadsafe(self._wake.set)

    @property
    def queued(self) -> int:
        """Impressions waiting or in flight."""
        return self._queued

    def close(self, timeout: float = 5.0) -> None:
        """Stops taking impressions, publishes what is queued for up to `timeout` s, then stops.

        What is still queued when the time runs out is dropped (counted as "shutdown").
        """
        with self._lock:
            self._closing = True
            if self._loop is not None:
                self._idle.wait_for(lambda: self._queued == 0, timeout)
        if self._loop is not None:
            if self._task is not None:
                self._task.cancel()
            if self._nc is not None:
                try:
                    self._loop.run(self._nc.close(), timeout=2.0)
                except (TimeoutError, *TRANSIENT_ERRORS):
                    pass
            self._loop.close()
        with self._lock:
            if self._queued:
                IMPRESSIONS_DROPPED.labels("shutdown").inc(self._queued)
            self._queue.clear()
            self._queued = 0
            IMPRESSIONS_QUEUED.set(0)

    # ----------------------------------------------------------- on the background loop

    async def _publish_forever(self) -> None:
        try:
            await self._connect_and_publish()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Not a NATS failure (those are retried): a bug. Say so loudly; Predict goes on,
            # and the queue fills and drops (counted).
            _LOGGER.exception("the impression publisher stopped")
            raise

    async def _connect_and_publish(self) -> None:
        self._nc = nc = await connect(self._streams, "serving", attempts=0)
        js = nc.jetstream(timeout=self._streams.timeout)
        await self._retry_forever(lambda: ensure_streams(js, self._streams), "setting up the streams")
        while True:
            taken = await self._take()
            messages, impressions, skipped = self._messages(taken, nc.max_payload)
            await self._publish(js, messages)
            IMPRESSIONS_PUBLISHED.inc(impressions)
            for reason, count in skipped.items():
                IMPRESSIONS_DROPPED.labels(reason).inc(count)
            self._done(sum(s.batch for s in taken))

    async def _take(self) -> list[ScoredRequest]:
        """The next calls to publish (up to about `_PUBLISH_CHUNK` impressions); waits for one."""
        assert self._wake is not None
        while True:
            with self._lock:
                taken: list[ScoredRequest] = []
                count = 0
                while self._queue and count < _PUBLISH_CHUNK:
                    taken.append(self._queue.popleft())
                    count += taken[-1].batch
                if taken:
                    return taken
                self._publisher_waiting = True
                self._wake.clear()
            await self._wake.wait()

    def _done(self, count: int) -> None:
        with self._lock:
            self._queued -= count
            IMPRESSIONS_QUEUED.set(self._queued)
            if self._queued == 0:
                self._idle.notify_all()

    def _messages(self, taken: list[ScoredRequest], max_payload: int) -> tuple[list[Message], int, dict[str, int]]:
        """The messages of the calls taken, the impressions they carry, and those left out by reason."""
        messages = []
        impressions = 0
        skipped = {"no_item": 0, "too_large": 0}
        for scored in taken:
            built = impression_messages(scored, self._streams.partitions, max_payload)
            loggable = int(np.count_nonzero(scored.keys.request_ids != ""))
            logged = sum(m.candidates for m in built)
            with_item = sum(1 for r, i in zip(scored.keys.request_ids.tolist(), scored.keys.item_ids) if r and i)
            skipped["no_item"] += loggable - with_item
            skipped["too_large"] += with_item - logged
            messages.extend(m.message for m in built)
            impressions += logged
        return messages, impressions, {reason: count for reason, count in skipped.items() if count}

    async def _publish(self, js: JetStream, messages: list[Message]) -> None:
        """Publishes every message, pipelined, retrying the failed ones until none fail."""
        backoff = 0.05
        pending = messages
        while pending:
            failed, stream_missing = await publish_round(js, pending, EVENTS_STREAM, self._streams.timeout)
            if not failed:
                return
            IMPRESSION_PUBLISH_FAILURES.inc(len(failed))
            if stream_missing:  # deleted under us: set it up again before the retry
                await self._retry_forever(lambda: ensure_streams(js, self._streams), "setting up the streams")
            pending = failed
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    @staticmethod
    async def _retry_forever(attempt: Callable[[], Awaitable[None]], what: str) -> None:
        backoff = 0.1
        while True:
            try:
                await attempt()
                return
            except TRANSIENT_ERRORS as exc:
                _LOGGER.warning("%s failed (retrying): %s", what, exc or type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
