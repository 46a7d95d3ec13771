"""The bare JetStream publish rate of one client: the baseline a stream's producer is held to.

`BarePublisher` publishes copies of given messages (the same payloads and headers, each with
a fresh `Nats-Msg-Id` so none is dropped as a duplicate) to a stream of its own set up like
SAMPLES (file storage, the same limits and duplicate window), as fast as one client can:
in rounds of `PUBLISH_CHUNK` messages (`monolith.streams.publish`, the way the project's
producers publish), every acknowledgement awaited. Messages go to `<prefix>.<partition>` of the subject they came from,
so they spread over partitions as the originals did. It keeps one connection across rounds,
so rounds can interleave with another measurement on the same server.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence

from monolith.streams.config import SAMPLES_STREAM, StreamsConfig
from monolith.streams.jetstream import BackgroundLoop, Connection, connect, ensure_stream, stream_configs
from monolith.streams.publish import MSG_ID_HEADER, Message, publish_round
from monolith.streams.reader import StoredMessage

PUBLISH_CHUNK = 1000


class BarePublisher:
    """Publishes copies of `templates` to stream `name` (subjects `<name lowercased>.*`) in timed rounds.

    Args:
        config: where NATS is (its limits shape the stream).
        name: the stream's name; created if missing, purged on `open`.
        templates: the messages to copy, cycled; at least one.
    """

    def __init__(self, config: StreamsConfig, name: str, templates: Sequence[StoredMessage]) -> None:
        if not templates:
            raise ValueError("BarePublisher needs at least one message to copy")
        self._config = config
        self.name = name
        prefix = name.lower()
        self._templates = [
            (f"{prefix}.{m.subject.rsplit('.', 1)[-1]}", m.data,
             {k: v for k, v in m.headers.items() if not k.startswith("Nats-")}, m.headers.get(MSG_ID_HEADER, "msg"))
            for m in templates
        ]  # fmt: skip
        self.message_bytes = sum(len(m.data) + sum(len(k) + len(v) for k, v in m.headers.items())
                                 for m in templates) / len(templates)  # fmt: skip
        self._counter = itertools.count()
        self._loop = BackgroundLoop(f"bare-publish-{name}")
        self._nc: Connection | None = None

    def open(self) -> None:
        """Connects and sets up the stream (empty).

        Raises:
            Unavailable: NATS did not answer.
        """
        self._loop.run(self._open(), 10 * self._config.timeout)

    async def _open(self) -> None:
        self._nc = await connect(self._config, f"monolith-bare-publish-{self.name}", attempts=20)
        js = self._nc.jetstream(timeout=self._config.timeout)
        like = next(c for c in stream_configs(self._config) if c.name == SAMPLES_STREAM)
        wanted = dataclasses.replace(like, name=self.name, subjects=[f"{self.name.lower()}.*"], description=None)
        await ensure_stream(js, wanted)
        await js.purge_stream(self.name)

    def round(self, seconds: float) -> float:
        """Publishes for about `seconds` (whole chunks); returns messages stored per second.

        Raises:
            RuntimeError: a publish was not acknowledged (the rate would be meaningless).
        """
        return self._loop.run(self._round(seconds), seconds + 10 * self._config.timeout)

    async def _round(self, seconds: float) -> float:
        assert self._nc is not None, "open() first"
        js = self._nc.jetstream(timeout=self._config.timeout)
        stored = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            chunk = []
            for _ in range(PUBLISH_CHUNK):
                k = next(self._counter)
                subject, payload, headers, msg_id = self._templates[k % len(self._templates)]
                chunk.append(Message(subject, payload, f"{msg_id}#{k}", headers))
            failed = (await publish_round(js, chunk, self.name, self._config.timeout)).failed
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(chunk)} bare publishes not acknowledged")
            stored += len(chunk)
        return stored / (time.perf_counter() - started)

    def close(self) -> None:
        """Closes the connection and its loop (the stream stays)."""
        if self._nc is not None:
            try:
                self._loop.run(self._nc.close(), self._config.timeout)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        self._loop.close()

    def __enter__(self) -> BarePublisher:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
