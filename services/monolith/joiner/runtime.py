"""The joiner's NATS side: one connection, the streams, a reader per owned partition, and
storing reported actions. Runs on its own asyncio loop; the gRPC threads call `report`."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.common.errors import Unavailable
from monolith.joiner import metrics
from monolith.joiner.actions import check_actions
from monolith.joiner.config import JoinerConfig
from monolith.joiner.partition import PartitionReader, ensure_state_store
from monolith.joiner.quality import ServedQuality
from monolith.streams.config import EVENTS_STREAM, StreamsConfig, events_subject, partition_of
from monolith.streams.ids import action_message_id
from monolith.streams.jetstream import TRANSIENT_ERRORS, BackgroundLoop, connect, ensure_streams
from monolith.streams.publish import Message, publish_round

_LOGGER = logging.getLogger("monolith.joiner")

# Seconds between freezes of what the joins hold (see `JoinerRuntime._freeze_joins`).
FREEZE_SECONDS = 5.0


def owned_partitions(partitions: int, replica: int, replicas: int) -> list[int]:
    """The partitions replica `replica` of `replicas` joins: every replicas-th one."""
    if replicas < 1 or not 0 <= replica < replicas:
        raise ValueError(f"replica index must be in 0..{replicas - 1}, got {replica}")
    return [p for p in range(partitions) if p % replicas == replica]


class JoinerRuntime:
    """Connects, sets up the streams, joins the owned partitions, stores actions.

    Args:
        streams: the NATS server and stream settings.
        config: the join's settings.
        partitions: the partitions this replica joins.
    """

    def __init__(self, streams: StreamsConfig, config: JoinerConfig, partitions: Sequence[int]) -> None:
        self.streams = streams
        self.config = config
        self.partitions = list(partitions)
        self.readers: list[PartitionReader] = []
        self.quality = ServedQuality(config.quality_window)  # of the samples every partition publishes
        self._loop = BackgroundLoop("joiner-nats")
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._main = None
        self._nc = None
        self._js = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self, on_ready: Callable[[], None]) -> None:
        """Connects in the background (retrying until NATS answers), then calls `on_ready`."""
        self._main = self._loop.submit(self._run(on_ready))

    async def _run(self, on_ready: Callable[[], None]) -> None:
        self._stop = asyncio.Event()
        self._nc = await connect(self.streams, "joiner", attempts=0)
        self._js = self._nc.jetstream(timeout=self.streams.timeout)
        while True:
            try:
                await ensure_streams(self._js, self.streams)
                await ensure_state_store(self._js, self.streams.replicas)
                break
            except TRANSIENT_ERRORS as exc:
                _LOGGER.warning("setting up the streams failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
        self.readers = [PartitionReader(self._js, p, self.config, self.streams, self.quality) for p in self.partitions]
        self._ready.set()
        on_ready()
        _LOGGER.info("joining partitions %s of %d", self.partitions, self.streams.partitions)
        await asyncio.gather(self._freeze_joins(), *(reader.run(self._stop) for reader in self.readers))

    async def _freeze_joins(self) -> None:
        """Moves what survived the young collections out of the collector's sight, now and then.

        The joins' records (a few per open key, millions under load) live long and form no
        cycles; a full collection would walk them all while every partition and ReportActions
        wait (measured: 0.16 s per 500,000 keys, and full passes come each time the heap grows
        by a quarter). Frozen, they are still freed when dropped, by reference counting. The
        cost: a cycle that becomes garbage after reaching the oldest generation is kept.
        """
        assert self._stop is not None
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), FREEZE_SECONDS)
            except asyncio.TimeoutError:
                gc.collect(1)  # the young generations' cycles first, so they are not frozen
                gc.freeze()

    def report(self, actions: Sequence[pb.Action]) -> int:
        """Checks every action, then stores them all on EVENTS; returns how many.

        Raises:
            InvalidArgument: an action is bad (nothing is stored).
            Unavailable: NATS is not reachable or did not confirm in time (some actions may
                be stored; reporting them again stores each once, by message id).
        """
        check_actions(actions, self.config, time.time())
        if not self.ready:
            raise Unavailable("the joiner is not connected to NATS yet")
        try:
            self._loop.run(self._store(actions), timeout=self.streams.timeout + 1.0)
        except (TimeoutError, *TRANSIENT_ERRORS) as exc:
            raise Unavailable(f"storing actions on NATS failed: {exc or type(exc).__name__}; retry") from None
        for action in actions:
            metrics.ACTIONS_REPORTED.labels(action.kind).inc()
        return len(actions)

    async def _store(self, actions: Sequence[pb.Action]) -> None:
        assert self._js is not None
        messages = [
            Message(
                events_subject(partition_of(action.request_id, self.streams.partitions)),
                pb.Event(action=action).SerializeToString(),
                action_message_id(action.request_id, action.item_id, action.kind),
            )
            for action in actions
        ]
        done = await publish_round(self._js, messages, EVENTS_STREAM, self.streams.timeout)
        if done.failed:
            raise Unavailable(f"{len(done.failed)} of {len(messages)} actions not confirmed by NATS; retry")

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the readers (between batches), closes the connection and the loop."""
        if self._stop is not None:
            self._loop.loop.call_soon_threadsafe(self._stop.set)
        if self._main is not None and self.ready:
            try:
                self._main.result(timeout)
            except Exception as exc:  # noqa: BLE001 - shutting down: log, then close regardless
                _LOGGER.debug("joiner loop ended with %r", exc)
        if self._nc is not None:
            try:
                self._loop.run(self._nc.close(), timeout=5.0)
            except Exception:  # noqa: BLE001
                pass
        self._loop.close()
