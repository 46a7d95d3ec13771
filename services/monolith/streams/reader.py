"""Reading a stream in sequence order from a given sequence, without acknowledgements.

An `OrderedReader` is an ephemeral pull consumer with no acknowledgements: the server keeps
no position for it beyond the consumer itself (dropped after `inactive_threshold` when the
reader goes away), so the reader, not the server, owns where it is. That is what the joiner
needs (it resumes from its own snapshot) and what a read-back needs (everything, once).

The reader guarantees order without gaps: a delivery the client lost in flight (its
consumer sequence skips one) raises `DeliveryGap`, and the caller reopens from where it
is sure of.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from monolith.streams.jetstream import TRANSIENT_ERRORS, JetStream


@dataclasses.dataclass(frozen=True)
class StoredMessage:
    """One message as a stream holds it.

    Attributes:
        sequence: its stream sequence.
        subject: where it was published.
        headers: its headers (empty if it has none).
        data: the payload (empty for a headers-only delivery).
    """

    sequence: int
    subject: str
    headers: Mapping[str, str]
    data: bytes

    @classmethod
    def of(cls, msg: Msg) -> StoredMessage:
        """The message the client delivered (from a consumer, with its metadata)."""
        return cls(msg.metadata.sequence.stream, msg.subject, dict(msg.headers or {}), msg.data)


class DeliveryGap(RuntimeError):
    """A delivery was lost in flight: the reader cannot vouch for what follows; reopen it."""


class OrderedReader:
    """The messages of one stream (on a filter subject) in sequence order, from a start sequence.

    Open it with `open`; `fetch` until done; `close`.
    """

    def __init__(self, js: JetStream, stream: str, subscription: JetStream.PullSubscription, consumer: str,
                 pending: int) -> None:  # fmt: skip
        self._js = js
        self._stream = stream
        self._subscription = subscription
        self._consumer = consumer
        self._delivered = 0
        self.pending = pending  # messages after the last one fetched, as the server last said

    @classmethod
    async def open(
        cls, js: JetStream, stream: str, subject: str, start_sequence: int, inactive_threshold: float = 60.0,
        headers_only: bool = False,
    ) -> OrderedReader:  # fmt: skip
        """A reader of `stream`'s messages on `subject`, the first at or after `start_sequence`.

        Args:
            js: the JetStream context.
            stream: the stream's name.
            subject: the filter subject, e.g. "events.3" or "samples.*".
            start_sequence: the first stream sequence wanted (>= 1; below the stream's first
                message means from that first message).
            inactive_threshold: seconds after which the server drops the consumer once
                nobody fetches (a reader that was never closed, its process killed).
            headers_only: deliver headers without payloads (`StoredMessage.data` is empty).

        Raises:
            One of TRANSIENT_ERRORS: NATS is away or the stream is missing.
        """
        subscription = await js.pull_subscribe(
            subject,
            durable=None,
            stream=stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(1, start_sequence),
                ack_policy=AckPolicy.NONE,
                inactive_threshold=inactive_threshold,
                headers_only=headers_only or None,
            ),
        )
        info = await subscription.consumer_info()
        return cls(js, stream, subscription, info.name, int(info.num_pending or 0))

    async def fetch(self, max_messages: int, timeout: float) -> list[StoredMessage]:
        """The next messages, up to `max_messages`, waiting up to `timeout` s for any.

        A fetch that finds nothing waits for its whole batch or the timeout: a caller that
        is caught up (`pending` is 0) asks for one message, which returns as soon as it comes.

        Returns:
            The messages in sequence order; none if nothing came within `timeout`.

        Raises:
            DeliveryGap: a delivery was lost in flight.
            One of TRANSIENT_ERRORS: NATS is away.
        """
        try:
            messages = await self._subscription.fetch(max_messages, timeout=timeout)
        except TimeoutError:  # nothing new within the timeout (nats-py's and asyncio's are this one)
            self.pending = 0
            return []
        out = []
        for message in messages:
            meta = message.metadata
            self._delivered += 1
            if meta.sequence.consumer != self._delivered:
                raise DeliveryGap(f"delivery {meta.sequence.consumer} arrived, expected {self._delivered}")
            out.append(StoredMessage.of(message))
        if messages:
            self.pending = int(messages[-1].metadata.num_pending or 0)
        return out

    async def close(self, drop: bool = False) -> None:
        """Unsubscribes; the server drops the consumer after its inactive threshold.

        Args:
            drop: delete the consumer now (one more request, skipped while NATS is away).
        """
        try:
            await self._subscription.unsubscribe()
            if drop:
                await self._js.delete_consumer(self._stream, self._consumer)
        except TRANSIENT_ERRORS:
            pass


async def last_message(js: JetStream, stream: str, subject: str) -> StoredMessage | None:
    """The last message `stream` holds on `subject`; None if it holds none.

    Raises:
        One of TRANSIENT_ERRORS: NATS is away or the stream is missing.
    """
    try:
        raw = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return None
    return StoredMessage(int(raw.seq or 0), raw.subject or subject, dict(raw.headers or {}), raw.data or b"")
