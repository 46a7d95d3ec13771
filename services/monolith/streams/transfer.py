"""Reading the first messages of a stream, and copying them to another NATS server as they are.

For measuring one stage alone on real traffic: the capacity benchmark copies what a live
stack stored on EVENTS (or SAMPLES) to a server of its own, then starts a single joiner (or
trainer) on it. Payloads and headers are copied unchanged, message ids included (so the copy
is what the stage would have read), and each message goes to the subject it was stored on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from monolith.streams.config import StreamsConfig
from monolith.streams.jetstream import connect, ensure_streams
from monolith.streams.publish import MSG_ID_HEADER, Message, publish_round
from monolith.streams.reader import OrderedReader, StoredMessage

FETCH_BATCH = 1000


def head(config: StreamsConfig, stream: str, subjects: str, count: int, last_sequence: int = 0,
         keep: Callable[[StoredMessage], bool] | None = None,
         timeout: float = 120.0) -> list[StoredMessage]:  # fmt: skip
    """Up to `count` messages from the start of `stream` on `subjects`, in sequence order.

    Args:
        config: where NATS is.
        stream: the stream's name.
        subjects: its filter subject (">" for all).
        count: messages wanted at most.
        last_sequence: read no message after this sequence (0: up to the newest).
        keep: only messages for which this is true count (and are returned).
        timeout: seconds for the whole read.

    Raises:
        TimeoutError: the read took longer than `timeout`.
        Unavailable or one of TRANSIENT_ERRORS: NATS is away or the stream is missing.
    """
    return asyncio.run(asyncio.wait_for(_head(config, stream, subjects, count, last_sequence, keep), timeout))


async def _head(config: StreamsConfig, stream: str, subjects: str, count: int, last_sequence: int,
                keep: Callable[[StoredMessage], bool] | None) -> list[StoredMessage]:  # fmt: skip
    nc = await connect(config, "monolith-transfer-read")
    try:
        reader = await OrderedReader.open(nc.jetstream(timeout=config.timeout), stream, subjects, 1,
                                          inactive_threshold=10.0)  # fmt: skip
        out: list[StoredMessage] = []
        try:
            while len(out) < count and reader.pending:
                batch = await reader.fetch(FETCH_BATCH, timeout=config.timeout)
                if not batch:
                    break
                for message in batch:
                    if last_sequence and message.sequence > last_sequence:
                        return out
                    if keep is None or keep(message):
                        out.append(message)
                        if len(out) == count:
                            return out
        finally:
            await reader.close(drop=True)
        return out
    finally:
        await nc.close()


def copy_head(source: StreamsConfig, target: StreamsConfig, stream: str, subjects: str, count: int,
              last_sequence: int = 0, timeout: float = 600.0) -> int:  # fmt: skip
    """Copies up to `count` messages from the start of `stream` on one server to the same stream on another.

    Each message goes to the subject it came from, with its payload and headers unchanged, in
    sequence order; the target's streams are set up first (`ensure_streams`).

    Args:
        source: where the messages are.
        target: where they go (their stream must be one of `ensure_streams`'s: EVENTS or SAMPLES).
        stream: the stream's name on both.
        subjects: the filter subject on the source (">" for all).
        count: messages to copy at most.
        last_sequence: copy no message after this source sequence (0: up to the newest).
        timeout: seconds for the whole copy.

    Returns:
        The number of messages copied.

    Raises:
        RuntimeError: some message was not stored.
        TimeoutError: the copy took longer than `timeout`.
    """
    return asyncio.run(asyncio.wait_for(_copy(source, target, stream, subjects, count, last_sequence), timeout))


async def _copy(source: StreamsConfig, target: StreamsConfig, stream: str, subjects: str, count: int,
                last_sequence: int) -> int:  # fmt: skip
    reading = await connect(source, "monolith-transfer-read")
    writing = await connect(target, "monolith-transfer-write", attempts=20)
    try:
        js = writing.jetstream(timeout=target.timeout)
        await ensure_streams(js, target)
        reader = await OrderedReader.open(reading.jetstream(timeout=source.timeout), stream, subjects, 1,
                                          inactive_threshold=10.0)  # fmt: skip
        copied = 0
        try:
            while copied < count and reader.pending:
                batch = await reader.fetch(min(FETCH_BATCH, count - copied), timeout=source.timeout)
                batch = [m for m in batch if not last_sequence or m.sequence <= last_sequence]
                if not batch:
                    break
                copies = [Message(m.subject, m.data, m.headers.get(MSG_ID_HEADER, f"copy/{m.sequence}"),
                                  {k: v for k, v in m.headers.items() if k != MSG_ID_HEADER}) for m in batch]  # fmt: skip
                failed = (await publish_round(js, copies, stream, target.timeout)).failed
                if failed:
                    raise RuntimeError(f"{len(failed)} of {len(batch)} copied messages not stored")
                copied += len(batch)
        finally:
            await reader.close(drop=True)
        return copied
    finally:
        await reading.close()
        await writing.close()
