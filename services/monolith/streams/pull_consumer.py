"""A durable JetStream pull consumer for synchronous callers, shared by several processes.

Every process that opens the consumer by the same durable name shares its messages: the
server hands each message to one of them, and redelivers it (to any of them) when it is
not acknowledged within `ack_wait`. The caller acknowledges a message only once its work
is done, so a process that dies mid-work loses nothing.

nats-py is asyncio; this wraps it with a `BackgroundLoop` so that a training loop on the
main thread can call it directly. Every call is bounded by a timeout and raises one of
`TRANSIENT_ERRORS` (or `TimeoutError`) when NATS is away: the caller retries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from monolith.streams.config import StreamsConfig
from monolith.streams.jetstream import TRANSIENT_ERRORS, BackgroundLoop, connect, ensure_streams

_LOGGER = logging.getLogger("monolith.streams")


@dataclasses.dataclass(frozen=True)
class ConsumerSettings:
    """Which messages a durable consumer reads and how the server paces them.

    Attributes:
        stream: the stream's name.
        subjects: the filter subject, e.g. "samples.>".
        durable: the durable consumer's name; processes opening the same name share it.
        ack_wait: seconds a delivered message may stay unacknowledged (and without an
            in-progress signal) before the server redelivers it.
        max_ack_pending: messages delivered and not yet acknowledged, over every process
            sharing the consumer; the server delivers no more beyond it.
    """

    stream: str
    subjects: str
    durable: str
    ack_wait: float = 30.0
    max_ack_pending: int = 4096


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One delivered message.

    Attributes:
        data: the payload.
        sequence: its stream sequence.
        deliveries: how many times the server has delivered it (1 the first time).
    """

    data: bytes
    sequence: int
    deliveries: int
    _msg: Msg = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class ConsumerState:
    """What the server reports about the consumer.

    Attributes:
        pending: messages on the stream not yet delivered to anyone (the lag).
        ack_pending: messages delivered and not yet acknowledged.
        ack_floor: the stream sequence up to which every message is acknowledged.
        redelivered: messages delivered more than once and not yet acknowledged.
        delivered: the stream sequence of the newest message delivered.
    """

    pending: int
    ack_pending: int
    ack_floor: int
    redelivered: int
    delivered: int = 0


def consumer_config(settings: ConsumerSettings, start_sequence: int = 0) -> ConsumerConfig:
    """The durable consumer's config: from the stream's start, or from `start_sequence` (> 0)."""
    position: dict[str, object] = {"deliver_policy": DeliverPolicy.ALL}
    if start_sequence > 0:
        position = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_sequence}
    return ConsumerConfig(
        name=settings.durable,
        durable_name=settings.durable,
        filter_subject=settings.subjects,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        max_ack_pending=settings.max_ack_pending,
        **position,  # type: ignore[arg-type]
    )


class ConsumerAdmin:
    """Reads and moves a durable consumer's position, for the checkpoint controller.

    Args:
        streams: where NATS is.
        settings: the consumer (as its trainers open it).
    """

    def __init__(self, streams: StreamsConfig, settings: ConsumerSettings) -> None:
        self.streams = streams
        self.settings = settings
        self._loop = BackgroundLoop(f"nats-admin-{settings.durable}")
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None

    async def _connected(self) -> JetStreamContext:
        if self._nc is None or self._nc.is_closed:
            self._nc = await connect(self.streams, "controller", attempts=1)
            self._js = self._nc.jetstream(timeout=self.streams.timeout)
        assert self._js is not None
        return self._js

    def position(self) -> ConsumerState | None:
        """The consumer's state; None if it does not exist (yet).

        Raises:
            TimeoutError or one of TRANSIENT_ERRORS: NATS is away.
        """
        return self._loop.run(self._position(), timeout=4 * self.streams.timeout)

    async def _position(self) -> ConsumerState | None:
        js = await self._connected()
        try:
            info = await js.consumer_info(self.settings.stream, self.settings.durable)
        except nats.js.errors.NotFoundError:
            return None
        return state_of(info)

    def rewind(self, after_sequence: int) -> None:
        """Recreates the consumer so that it delivers every message after `after_sequence`.

        Messages delivered and not acknowledged are forgotten with the old consumer: call
        it only while every process sharing the consumer is paused.
        """
        self._loop.run(self._rewind(after_sequence), timeout=4 * self.streams.timeout)

    async def _rewind(self, after_sequence: int) -> None:
        js = await self._connected()
        await ensure_streams(js, self.streams)
        try:
            await js.delete_consumer(self.settings.stream, self.settings.durable)
        except nats.js.errors.NotFoundError:
            pass
        await js.add_consumer(self.settings.stream, consumer_config(self.settings, after_sequence + 1))

    def close(self) -> None:
        if self._nc is not None:
            try:
                self._loop.run(self._nc.close(), timeout=self.streams.timeout + 1.0)
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                _LOGGER.debug("closing the NATS connection: %s", exc)
        self._loop.close()


def state_of(info: object) -> ConsumerState:
    """The state in the server's consumer info."""
    return ConsumerState(
        pending=int(info.num_pending or 0),  # type: ignore[attr-defined]
        ack_pending=int(info.num_ack_pending or 0),  # type: ignore[attr-defined]
        ack_floor=int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,  # type: ignore[attr-defined]
        redelivered=int(info.num_redelivered or 0),  # type: ignore[attr-defined]
        delivered=int(info.delivered.stream_seq or 0) if info.delivered else 0,  # type: ignore[attr-defined]
    )


class DurableConsumer:
    """A durable pull consumer of one stream, usable from synchronous code.

    Args:
        streams: where NATS is and the streams' limits (the streams are created if absent).
        settings: the consumer.
        client_name: the connection's name as the server shows it.
    """

    def __init__(self, streams: StreamsConfig, settings: ConsumerSettings, client_name: str) -> None:
        self.streams = streams
        self.settings = settings
        self._client_name = client_name
        self._loop = BackgroundLoop(f"nats-{settings.durable}")
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None

    @property
    def connected(self) -> bool:
        """Whether the connection to NATS is up now."""
        return self._nc is not None and self._nc.is_connected

    @property
    def is_open(self) -> bool:
        """Whether `open` has succeeded (the subscription exists; NATS may be away since)."""
        return self._subscription is not None

    def open(self) -> None:
        """Connects (once), makes sure the streams and the consumer exist, and subscribes.

        Safe to repeat: after an outage that lost the consumer (a server started on an
        empty store) it creates it again; with the same settings it changes nothing.

        Raises:
            Unavailable, TimeoutError or one of TRANSIENT_ERRORS: NATS is not there yet.
        """
        self._loop.run(self._open(), timeout=4 * self.streams.timeout)

    async def _open(self) -> None:
        if self._nc is None or self._nc.is_closed:
            self._nc = await connect(self.streams, self._client_name, attempts=1)
            self._js = self._nc.jetstream(timeout=self.streams.timeout)
        js = self._js
        assert js is not None
        await ensure_streams(js, self.streams)
        settings = self.settings
        try:
            # An existing consumer is used as it is: the checkpoint controller may have
            # recreated it at a position (deliver by start sequence), which creating it
            # again with "deliver all" would be refused as a change of policy.
            await js.consumer_info(settings.stream, settings.durable)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(settings.stream, consumer_config(settings))
        if self._subscription is not None:
            try:
                await self._subscription.unsubscribe()
            except nats.errors.Error:
                pass  # the old inbox is gone with the old connection state
        self._subscription = await js.pull_subscribe_bind(durable=settings.durable, stream=settings.stream)

    def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """What is there now, up to `max_messages`; waits up to `timeout` only while nothing is.

        A batch never waits to fill: under a backlog one call takes `max_messages` at once,
        and a trickle is handed over message by message as it comes.

        Returns:
            The messages (none when nothing came within `timeout`).

        Raises:
            RuntimeError: `open` has not succeeded.
            TimeoutError or one of TRANSIENT_ERRORS: NATS is away or the consumer is gone.
        """
        if self._subscription is None:
            raise RuntimeError("the consumer is not open")
        return self._loop.run(self._fetch(max_messages, timeout), timeout=timeout + 2 * self.streams.timeout + 5.0)

    async def _fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        messages = await self._available(max_messages)
        if not messages:
            subscription = self._subscription
            assert subscription is not None
            # Nothing there: wait for the first (nats-py raises its own TimeoutError, or
            # asyncio's, which is the builtin: both only mean nothing came), then take the
            # rest of what arrived meanwhile without waiting.
            try:
                messages = await subscription.fetch(1, timeout=timeout)
            except TimeoutError:
                return []
            if max_messages > 1:
                try:
                    messages += await self._available(max_messages - 1)
                except (TimeoutError, *TRANSIENT_ERRORS):
                    pass  # the first message is delivered: hand it over rather than lose it to a retry
        return [Delivery(m.data, m.metadata.sequence.stream, m.metadata.num_delivered, m) for m in messages]

    async def _available(self, max_messages: int) -> list[Msg]:
        """Up to `max_messages` the server holds for this consumer now, in one no-wait pull.

        nats-py's `fetch` of several messages waits for the batch to fill (or its timeout to
        pass) once a message has come; a pull request with `no_wait` and no `expires` is
        answered at once instead: the messages there are, then a 404 status when they are
        fewer than asked. The request is made on the subscription's own inbox, as nats-py's
        `fetch` makes it (its `_nms` and `_deliver`, nats-py 2.16).
        """
        subscription = self._subscription
        assert subscription is not None and self._nc is not None
        request = json.dumps({"batch": max_messages, "no_wait": True}).encode()
        await self._nc.publish(subscription._nms, request, subscription._deliver)  # noqa: SLF001
        messages: list[Msg] = []
        while len(messages) < max_messages:
            msg = await subscription._sub.next_msg(timeout=self.streams.timeout)  # noqa: SLF001
            if not JetStreamContext.is_status_msg(msg):
                messages.append(msg)
            elif not JetStreamContext._is_heartbeat(JetStreamContext.is_status_msg(msg)):  # noqa: SLF001
                break  # 404 no (more) messages, 408 request expired, 409 limits: the answer is complete
        return messages

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledges messages: hands the acks to the connection without waiting for the server.

        No round trip per step: the acks go out with the connection's next write, ahead of
        the next fetch's request, so the server has them before it delivers more. While
        disconnected they wait in the client's buffer and go out on reconnect; an ack that
        never arrives means a redelivery after `ack_wait`, not a loss. (`flush` waits for
        the server to have everything sent so far.)
        """
        self._loop.run(self._reply(deliveries, "ack", flush=False), timeout=self.streams.timeout + 1.0)

    def flush(self) -> None:
        """Returns once the server has everything sent so far (acks included), or raises."""
        if self._nc is not None:
            self._loop.run(self._nc.flush(timeout=self.streams.timeout), timeout=self.streams.timeout + 1.0)

    def term(self, deliveries: Sequence[Delivery]) -> None:
        """Tells the server never to deliver these messages again (they cannot be processed)."""
        self._loop.run(self._reply(deliveries, "term"), timeout=self.streams.timeout + 1.0)

    def nak(self, deliveries: Sequence[Delivery]) -> None:
        """Hands messages back for redelivery now (to any process sharing the consumer)."""
        self._loop.run(self._reply(deliveries, "nak"), timeout=self.streams.timeout + 1.0)

    def in_progress(self, deliveries: Sequence[Delivery]) -> None:
        """Restarts the messages' `ack_wait`: their work is still going on (e.g. retrying)."""
        self._loop.run(self._reply(deliveries, "in_progress"), timeout=self.streams.timeout + 1.0)

    async def _reply(self, deliveries: Sequence[Delivery], kind: str, flush: bool = True) -> None:
        for delivery in deliveries:
            await getattr(delivery._msg, kind)()
        if flush and deliveries and self._nc is not None:
            await self._nc.flush(timeout=self.streams.timeout)

    def state(self) -> ConsumerState:
        """The consumer's state on the server.

        Raises:
            TimeoutError or one of TRANSIENT_ERRORS: NATS is away or the consumer is gone.
        """
        return self._loop.run(self._state(), timeout=self.streams.timeout + 1.0)

    async def _state(self) -> ConsumerState:
        js = self._js
        if js is None:
            raise nats.errors.ConnectionClosedError
        info = await js.consumer_info(self.settings.stream, self.settings.durable, timeout=self.streams.timeout)
        return state_of(info)

    def close(self) -> None:
        """Closes the connection and the loop (acks are flushed when they are sent)."""
        if self._nc is not None:
            try:
                self._loop.run(self._close(), timeout=self.streams.timeout + 1.0)
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                _LOGGER.debug("closing the NATS connection: %s", exc)
        self._loop.close()

    async def _close(self) -> None:
        nc = self._nc
        if nc is not None and not nc.is_closed:
            await nc.close()
