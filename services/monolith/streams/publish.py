"""JetStream publishing, each message with a message id: one at a time (`publish`), or many
in flight (`publish_round`).

Waiting for each acknowledgement before sending the next caps a publisher at one round
trip per message (a few thousand a second at best, far less on a loaded machine). Here a
round sends every message, then collects the acknowledgements; the ones that failed
(NATS down, slow, the stream missing) come back to be sent again. The message id makes a
re-send of a message that was stored after all (its acknowledgement lost) a no-op within
the stream's duplicate window.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from nats.aio.client import Client
from nats.aio.msg import Msg

from monolith.streams.jetstream import TRANSIENT_ERRORS, JetStream

_LOGGER = logging.getLogger("monolith.streams")

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
STATUS_HEADER = "Status"  # where nats-py puts a reply's status code
NO_RESPONDERS = "503"


class Message(NamedTuple):
    """One message for a stream.

    Attributes:
        subject: where it goes (e.g. "events.3").
        payload: the serialized message.
        msg_id: its `Nats-Msg-Id`, unique per logical message (JetStream drops repeats);
            built by `monolith.streams.ids`.
        headers: further headers (e.g. the position a sample was decided at).
    """

    subject: str
    payload: bytes
    msg_id: str
    headers: Mapping[str, str] | None = None

    def all_headers(self) -> dict[str, str]:
        """The headers it is published with: its own and the message id."""
        return {**(self.headers or {}), MSG_ID_HEADER: self.msg_id}


class Round(NamedTuple):
    """What one round of `publish_round` did.

    Attributes:
        failed: the messages not stored (send them again).
        stream_missing: some publish found no stream for its subject (set the streams up).
    """

    failed: list[Message]
    stream_missing: bool


async def publish(js: JetStream, message: Message, stream: str, timeout: float) -> None:
    """Publishes one message and waits for its acknowledgement.

    For a publisher whose next message may only be stored once this one is (the joiner:
    a later sample stored before an earlier one would make a restart skip the earlier).

    Raises:
        One of TRANSIENT_ERRORS: not stored (or not confirmed) within `timeout`.
    """
    await js.publish(message.subject, message.payload, timeout=timeout, stream=stream, headers=message.all_headers())


async def publish_round(js: JetStream, messages: Sequence[Message], stream: str, timeout: float) -> Round:
    """Sends all `messages`, then waits (`timeout` s in all) for their acknowledgements.

    Args:
        js: the JetStream context (its connection's one `Publisher` sends them).
        messages: what to publish.
        stream: the stream they must land in (a publish to a subject of another stream fails).
        timeout: seconds for the whole round.

    Returns:
        The messages that failed, and whether a stream was missing.
    """
    nc = js._nc  # noqa: SLF001 - the context's own connection: one publisher (one subscription) per connection
    publisher = _PUBLISHERS.get(nc)
    if publisher is None:
        publisher = _PUBLISHERS[nc] = Publisher(nc)
    return await publisher.round(messages, stream, timeout)


class _Round:
    """The acknowledgements one round still waits for."""

    __slots__ = ("messages", "failed", "waiting", "stream_missing", "done")

    def __init__(self, messages: Sequence[Message]) -> None:
        self.messages = messages
        self.failed: list[int] = []
        self.waiting: set[int] = set()
        self.stream_missing = False
        self.done = asyncio.get_running_loop().create_future()

    def settle(self, index: int, ok: bool, stream_missing: bool = False) -> None:
        if index not in self.waiting:
            return
        self.waiting.discard(index)
        if not ok:
            self.failed.append(index)
            self.stream_missing = self.stream_missing or stream_missing
        if not self.waiting and not self.done.done():
            self.done.set_result(None)


class Publisher:
    """Many JetStream publishes in flight on one connection, settled by one subscription.

    A JetStream publish is a NATS publish with a reply subject; the stream answers there with
    an acknowledgement (`{"stream": ..., "seq": ...}`), an error, or, when no stream takes the
    subject, a 503 status. nats-py's `publish_async` does this with a task for its semaphore
    wait, a future with a callback and random token bytes per message: measured here, five
    times the cost of a plain publish (about 6,000 against 30,000 messages/s from one client).
    A round here numbers its messages, sends each with a plain `publish` whose reply subject is
    `<inbox>.<n>`, and one subscription to `<inbox>.*` settles them as the answers come, in any
    order; what is not answered by the round's deadline failed (it may still be stored: the
    message id makes a re-send a no-op).

    Args:
        nc: the connection (reconnecting by itself; the subscription is renewed with it).
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._inbox = nc.new_inbox()
        self._subscribed = False
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[_Round, int]] = {}  # reply token -> its round and index

    async def round(self, messages: Sequence[Message], stream: str, timeout: float) -> Round:
        """Sends all `messages`, then waits (`timeout` s in all) for their acknowledgements."""
        deadline = time.monotonic() + timeout
        if not self._subscribed:
            await self._nc.subscribe(f"{self._inbox}.*", cb=self._answer)
            self._subscribed = True
        pending = _Round(messages)
        tokens = []
        for index, message in enumerate(messages):
            token = str(next(self._tokens))
            self._waiting[token] = (pending, index)
            pending.waiting.add(index)
            tokens.append(token)
            try:
                await self._nc.publish(
                    message.subject, message.payload, reply=f"{self._inbox}.{token}",
                    headers={**message.all_headers(), EXPECTED_STREAM_HEADER: stream},
                )  # fmt: skip
            except TRANSIENT_ERRORS:
                pending.settle(index, ok=False)
        try:
            if pending.waiting:
                await asyncio.wait_for(asyncio.shield(pending.done), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            for index in list(pending.waiting):  # not answered in time: failed (perhaps stored)
                pending.settle(index, ok=False)
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
        return Round([messages[i] for i in sorted(pending.failed)], pending.stream_missing)

    async def _answer(self, msg: Msg) -> None:
        found = self._waiting.pop(msg.subject[len(self._inbox) + 1 :], None)
        if found is None:
            return  # its round gave up on it
        pending, index = found
        if msg.headers and msg.headers.get(STATUS_HEADER) == NO_RESPONDERS:
            pending.settle(index, ok=False, stream_missing=True)
            return
        ok = b'"error"' not in msg.data
        if not ok:
            _LOGGER.debug("publish to %s refused: %s", pending.messages[index].subject, msg.data[:200])
        pending.settle(index, ok)


_PUBLISHERS: weakref.WeakKeyDictionary[Client, Publisher] = weakref.WeakKeyDictionary()
