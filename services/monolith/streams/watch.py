"""Following a stream from synchronous code: each message handed to a callback as it is stored.

A `StreamWatch` owns one connection on its own background loop. `follow` starts an ordered
push consumer (the client recreates it after a gap or a reconnect, from where it was; the
server keeps no state for it beyond the consumer), from the stream's start or from new
messages only, optionally headers only (no payload sent). The watch also answers what the
harness asks about streams and consumers while it follows: how far a stream goes, how far
behind a durable consumer is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from monolith.streams.config import StreamsConfig
from monolith.streams.jetstream import BackgroundLoop, Connection, JetStream, connect
from monolith.streams.pull_consumer import ConsumerState, state_of
from monolith.streams.reader import StoredMessage

_LOGGER = logging.getLogger("monolith.streams")


@dataclasses.dataclass(frozen=True)
class StreamState:
    """What a stream holds now.

    Attributes:
        messages: messages stored.
        first_sequence: the sequence of the oldest (0 if none).
        last_sequence: the sequence of the newest (0 if none ever).
    """

    messages: int
    first_sequence: int
    last_sequence: int


class StreamWatch:
    """One connection that follows a stream and answers questions about streams.

    Args:
        config: where NATS is.
        client_name: the connection's name as the server shows it.
        timeout: seconds for one request to NATS (connecting: three times as long).
    """

    def __init__(self, config: StreamsConfig, client_name: str, timeout: float = 10.0) -> None:
        self._config = config
        self._client_name = client_name
        self._timeout = timeout
        self._loop = BackgroundLoop(client_name)
        self._nc: Connection | None = None

    def follow(
        self, stream: str, subjects: str, on_message: Callable[[StoredMessage], None], from_start: bool,
        headers_only: bool = False,
    ) -> None:  # fmt: skip
        """Connects (once) and hands every message of `stream` on `subjects` to `on_message`.

        Args:
            stream: the stream's name.
            subjects: the filter subject, e.g. "samples.*".
            on_message: called on the watch's loop thread, in stream order, once per
                message; it must be quick (it holds up the next).
            from_start: from the stream's first message, else only messages stored from now.
            headers_only: deliver headers without payloads (`StoredMessage.data` is empty).

        Raises:
            Unavailable: NATS did not answer.
        """
        self._loop.run(self._follow(stream, subjects, on_message, from_start, headers_only), 3 * self._timeout)

    async def _follow(
        self, stream: str, subjects: str, on_message: Callable[[StoredMessage], None], from_start: bool,
        headers_only: bool,
    ) -> None:  # fmt: skip
        async def deliver(msg: Msg) -> None:
            on_message(StoredMessage.of(msg))

        js = await self._connected()
        await js.subscribe(
            subjects, stream=stream, cb=deliver, ordered_consumer=True, headers_only=headers_only or None,
            deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW,
        )  # fmt: skip

    async def _connected(self) -> JetStream:
        if self._nc is None:
            self._nc = await connect(self._config, self._client_name, attempts=10)
        return self._nc.jetstream(timeout=self._timeout)

    def stream_state(self, stream: str) -> StreamState:
        """How many messages `stream` holds and their sequences.

        Raises:
            TimeoutError, Unavailable or one of TRANSIENT_ERRORS: NATS is away or the stream is missing.
        """
        return self._loop.run(self._stream_state(stream), self._timeout)

    async def _stream_state(self, stream: str) -> StreamState:
        state = (await (await self._connected()).stream_info(stream)).state
        return StreamState(int(state.messages or 0), int(state.first_seq or 0), int(state.last_seq or 0))

    def consumer_state(self, stream: str, durable: str) -> ConsumerState | None:
        """The durable consumer's state; None if it does not exist.

        Raises:
            TimeoutError, Unavailable or one of TRANSIENT_ERRORS: NATS is away.
        """
        return self._loop.run(self._consumer_state(stream, durable), self._timeout)

    async def _consumer_state(self, stream: str, durable: str) -> ConsumerState | None:
        try:
            return state_of(await (await self._connected()).consumer_info(stream, durable))
        except nats.js.errors.NotFoundError:
            return None

    def close(self) -> None:
        """Stops following and closes the connection and the loop."""
        if self._nc is not None:
            try:
                self._loop.run(self._nc.close(), self._timeout)
            except (TimeoutError, asyncio.CancelledError, Exception) as exc:  # noqa: BLE001 - closing anyway
                _LOGGER.debug("closing NATS: %s", exc)
        self._loop.close()
