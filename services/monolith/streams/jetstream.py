"""Connecting to NATS, setting up the streams, and running the asyncio client from threads.

nats-py is asyncio; the gRPC servicers are threads. `BackgroundLoop` runs one event loop
on a daemon thread and lets synchronous code run coroutines on it (`run`) or hand them
off (`submit`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import threading
from typing import Any, Awaitable, Coroutine, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from monolith.common.errors import Unavailable
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig

_LOGGER = logging.getLogger("monolith.streams")
T = TypeVar("T")

# The client's types, named here for annotations outside this package (which imports no nats).
Connection = Client
JetStream = JetStreamContext

# What a lost connection, a server restart or a slow stream raise: retry later.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    nats.js.errors.Error,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
)


async def connect(config: StreamsConfig, name: str, attempts: int = 1) -> Client:
    """A NATS connection that reconnects forever once made.

    Args:
        config: where the server is.
        name: the client name the server shows (the role).
        attempts: initial connection attempts, 0.5 s apart (0: forever).

    Raises:
        Unavailable: no server answered within `attempts`.
    """
    attempt = 0
    tls: dict[str, Any] = {"tls": config.ssl_context()} if config.tls else {}
    if config.tls_server_name is not None:
        tls["tls_hostname"] = config.tls_server_name
    # nats-py tries each server once per round, connect_timeout each, then waits.
    attempt_seconds = len(config.servers) * (CONNECT_TIMEOUT + RECONNECT_WAIT) + 1.0
    while True:
        attempt += 1
        try:
            return await _connect_once(config, name, tls, attempt_seconds)
        except TRANSIENT_ERRORS as exc:
            what = f"TLS failed: {exc}" if isinstance(exc, ssl.SSLError) else f"unreachable: {exc or type(exc).__name__}"
            if attempts and attempt >= attempts:
                raise Unavailable(f"NATS at {config.url} {what}") from None
            if attempt == 1:  # a role that waits for NATS says so once
                _LOGGER.warning("%s: NATS at %s %s; retrying", name, config.url, what)
            await asyncio.sleep(RECONNECT_WAIT)


CONNECT_TIMEOUT = 2.0
RECONNECT_WAIT = 0.5


async def _connect_once(config: StreamsConfig, name: str, tls: dict[str, Any], seconds: float) -> Client:
    """One connection attempt, over every server: the connected client, or the error that ended it.

    nats-py alone would retry the first connection forever (a refused connection, a certificate
    it cannot verify) and can hang after a failed TLS handshake, so the attempt ends at the first
    TLS error, once every server has failed, or after `seconds`; a cancelled attempt is stopped too.
    """
    client = Client()
    failed: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
    connecting = asyncio.ensure_future(client.connect(
        servers=config.servers,
        name=name,
        **tls,
        connect_timeout=CONNECT_TIMEOUT,
        reconnect_time_wait=RECONNECT_WAIT,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        error_cb=_on_error(client, failed, len(config.servers)),
        disconnected_cb=_log_disconnected(client, name),
        reconnected_cb=_log_reconnected(name),
    ))  # fmt: skip
    try:
        await asyncio.wait({connecting, failed}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled while connecting: stop the attempt, then go
        await _abandon(client, connecting)
        raise
    if not connecting.done():
        await _abandon(client, connecting)
        raise failed.result() if failed.done() else TimeoutError(f"no NATS server answered in {seconds:g} s")
    connecting.result()  # the error that ended it, if any
    if config.tls and not client._server_info.get("tls_required"):  # nats-py speaks TLS only if asked
        await client.close()
        raise Unavailable(f"NATS at {config.url} does not require TLS, but this client is set to verify it "
                          "(--nats-tls-*): refusing a plaintext connection")  # fmt: skip
    return client


def _on_error(client: Client, failed: asyncio.Future[Exception], servers: int):  # type: ignore[no-untyped-def]
    """nats-py's error callback: logs; before the first connection, ends the attempt at a TLS
    error, or once as many errors came as there are servers."""
    failures = 0

    async def callback(exc: Exception) -> None:
        nonlocal failures
        if not client.is_connected and not failed.done():
            failures += 1
            if isinstance(exc, ssl.SSLError) or failures >= servers:
                failed.set_result(exc)
        await _log_error(exc)

    return callback


async def _abandon(client: Client, connecting: asyncio.Future[None]) -> None:
    """Stops a connection attempt nats-py would go on with (bounded: its close can hang after a
    failed TLS handshake)."""
    connecting.cancel()
    await asyncio.wait({connecting})
    if not connecting.cancelled():
        connecting.exception()  # retrieved: it failed meanwhile, and is abandoned either way
    closing = asyncio.ensure_future(client.close())
    await asyncio.wait({closing}, timeout=CONNECT_TIMEOUT)
    if closing.done() and not closing.cancelled():
        closing.exception()
    else:
        closing.cancel()


async def _log_error(exc: Exception) -> None:
    _LOGGER.debug("nats: %s", exc)


def _log_disconnected(client: Client, name: str):  # type: ignore[no-untyped-def]
    async def callback() -> None:
        if not (client.is_closed or client.is_draining):  # a close of our own is no outage
            _LOGGER.warning("%s: disconnected from NATS; reconnecting", name)

    return callback


def _log_reconnected(name: str):  # type: ignore[no-untyped-def]
    async def callback() -> None:
        _LOGGER.info("%s: reconnected to NATS", name)

    return callback


def stream_configs(config: StreamsConfig) -> list[StreamConfig]:
    """EVENTS and SAMPLES: file storage, limits retention (readers keep their own places)."""
    common = {
        "retention": RetentionPolicy.LIMITS,
        "storage": StorageType.FILE,
        "discard": DiscardPolicy.OLD,
        "num_replicas": config.replicas,
        "duplicate_window": config.duplicate_window,
        "allow_direct": True,
    }
    return [
        StreamConfig(
            name=EVENTS_STREAM,
            description="impressions (model-serving) and actions (ReportActions), by request_id partition",
            subjects=["events.*"],
            max_age=config.events_max_age,
            max_bytes=config.events_max_bytes,
            **common,
        ),
        StreamConfig(
            name=SAMPLES_STREAM,
            description="training samples joined by the sample-joiner, by request_id partition",
            subjects=["samples.*"],
            max_age=config.samples_max_age,
            max_bytes=config.samples_max_bytes,
            **common,
        ),
    ]


async def ensure_streams(js: JetStreamContext, config: StreamsConfig) -> None:
    """Creates both streams, or updates their limits to the config's; safe to repeat."""
    for wanted in stream_configs(config):
        await ensure_stream(js, wanted)


async def ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    """Creates stream `wanted`, or updates an existing one to its config; safe to repeat.

    An existing stream is looked up first and updated, never added again: the server counts
    an add's `max_bytes` against its storage before it notices the stream exists, so adding
    an existing 4 GiB stream can fail with "insufficient storage resources" on a small disk.
    """
    try:
        await js.stream_info(wanted.name)  # type: ignore[arg-type]
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(wanted)
            _LOGGER.info("created stream %s", wanted.name)
            return
        except nats.js.errors.BadRequestError:
            pass  # another process created it first: update below
    await js.update_stream(wanted)


class BackgroundLoop:
    """An asyncio event loop on a daemon thread, for synchronous callers.

    Args:
        name: the thread's name.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedules `coro` on the loop; returns a future for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs `coro` on the loop and waits for its result (`timeout` seconds at most).

        Raises:
            TimeoutError: it took longer (the coroutine is cancelled).
        """
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the coroutine's own timeout, not ours
            future.cancel()
            raise TimeoutError(f"no answer within {timeout} s") from None

    def close(self, timeout: float = 5.0) -> None:
        """Cancels what still runs, stops the loop and joins its thread."""
        if not self.loop.is_running():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.submit(cancel_all()).result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


async def wait_for(awaitable: Awaitable[T], timeout: float) -> T:
    """`asyncio.wait_for`, named for readers of the call sites."""
    return await asyncio.wait_for(awaitable, timeout)
