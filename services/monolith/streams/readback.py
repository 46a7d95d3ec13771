"""Reading a whole stream back, synchronously: for tests, tools and the harness.

`read_stream` connects, reads every message the stream holds on the subjects (an
`OrderedReader` from the first sequence), and disconnects; the whole call is bounded by a
timeout. It is a snapshot for checking and reconciling, not a way to follow a stream (see
`monolith.streams.watch` for that).
"""

from __future__ import annotations

import asyncio
import time

import nats.js.errors

from monolith.streams.config import StreamsConfig
from monolith.streams.jetstream import connect
from monolith.streams.reader import OrderedReader, StoredMessage

FETCH_BATCH = 1000


def read_stream(
    config: StreamsConfig, stream: str, subjects: str = ">", timeout: float = 30.0
) -> list[StoredMessage]:  # fmt: skip
    """Every message `stream` holds on `subjects`, in sequence order.

    Messages stored while it reads may be included too; it stops once it has read as many
    as the stream held when it started (counted on `subjects`).

    Args:
        config: where NATS is.
        stream: the stream's name, e.g. EVENTS_STREAM.
        subjects: a filter subject within the stream's subjects ("samples.3", "events.*");
            ">" reads them all.
        timeout: seconds for the whole read, connecting included.

    Returns:
        The messages; [] if the stream does not exist or holds none on `subjects`.

    Raises:
        TimeoutError: the read took longer than `timeout`.
        Unavailable or one of TRANSIENT_ERRORS: NATS is away.
    """
    return asyncio.run(asyncio.wait_for(_read(config, stream, subjects, time.monotonic() + timeout), timeout))


async def _read(config: StreamsConfig, stream: str, subjects: str, deadline: float) -> list[StoredMessage]:
    nc = await connect(config, "monolith-readback")
    try:
        js = nc.jetstream(timeout=config.timeout)
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        if not info.state.messages:
            return []
        reader = await OrderedReader.open(js, stream, subjects, 1, inactive_threshold=10.0)
        out: list[StoredMessage] = []
        try:
            wanted = reader.pending
            while len(out) < wanted:
                out += await reader.fetch(min(FETCH_BATCH, wanted - len(out)), max(0.1, deadline - time.monotonic()))
        finally:
            await reader.close(drop=True)
        return out
    finally:
        await nc.close()
