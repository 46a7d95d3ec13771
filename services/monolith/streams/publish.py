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
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import nats.js.errors

from monolith.streams.jetstream import TRANSIENT_ERRORS, JetStream

MSG_ID_HEADER = "Nats-Msg-Id"


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
        js: the JetStream context.
        messages: what to publish (at most the context's async-publish limit, 4000 by default,
            or the sends wait for earlier acknowledgements).
        stream: the stream they must land in (a publish to a subject of another stream fails).
        timeout: seconds for the whole round.

    Returns:
        The messages that failed, and whether a stream was missing.
    """
    deadline = time.monotonic() + timeout
    failed: list[Message] = []
    in_flight: list[tuple[Message, asyncio.Future]] = []  # type: ignore[type-arg]
    for message in messages:
        try:
            future = await js.publish_async(
                message.subject, message.payload, wait_stall=max(0.0, deadline - time.monotonic()), stream=stream,
                headers=message.all_headers(),
            )  # fmt: skip
        except TRANSIENT_ERRORS:
            failed.append(message)
            continue
        in_flight.append((message, future))
    stream_missing = False
    for message, future in in_flight:
        try:
            # A future the server never answers (its connection lost) is cancelled here.
            await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except TRANSIENT_ERRORS as exc:
            stream_missing = stream_missing or isinstance(exc, nats.js.errors.NoStreamResponseError)
            failed.append(message)
    return Round(failed, stream_missing)
