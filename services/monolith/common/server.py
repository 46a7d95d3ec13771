"""The one server factory: every monolith gRPC server is built here.

`build_server` returns an unstarted server with error mapping, metrics, health and
reflection attached and its port already bound, so tests can bind port 0 and read the
port back. Only `main` starts it, usually via `run_until_signal`, which drains on SIGTERM
the way Kubernetes expects: health NOT_SERVING, `stop(grace)`, then flush.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from types import FrameType, TracebackType
from typing import Annotated, Any

import grpc
import pydantic
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from monolith.common import metrics
from monolith.common.config import ConfigModel, parse_config
from monolith.common.errors import ConfigError
from monolith.common.interceptor import ErrorAndMetricsInterceptor

FULL_COLLECTION_EVERY = 1000  # middle-generation passes per full pass (CPython's default: 10)
# After the grace period gRPC cancels the calls still open; they close within moments.
# A stop that takes longer than this beyond the grace period is given up on (and logged),
# so a call gRPC never closes cannot keep a process from exiting on SIGTERM.
STOP_MARGIN_SECONDS = 2.0

_LOGGER = logging.getLogger("monolith.server")

_INT32_MAX = 2**31 - 1  # gRPC channel arguments are C ints.

# Ping idle clients so half-open connections (a node gone without a FIN) are noticed, and
# accept client pings every 10 s: a stricter limit makes the server answer clients
# that use keepalive with GOAWAY "too_many_pings".
_KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


class ServerStartError(RuntimeError):
    """A port could not be bound (in use, or the address is not this host's); one line, for the CLI."""


def tune_gc() -> None:
    """The garbage-collector settings of every server, applied once what it loaded is loaded.

    What is loaded by now (libraries, tables, models) lives as long as the process;
    freezing it keeps the collector's full passes small. Requests allocate short-lived
    objects that rarely form cycles, so full passes can also be rare: with the default
    thresholds they ran every ~1.5 s under load and showed up as 30-50 ms latency spikes
    (measured on the serving benchmark). Benchmarks apply the same settings to the
    in-process side of a comparison.
    """
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


Port = Annotated[int, pydantic.Field(ge=0, le=65535)]


class ServerConfig(ConfigModel):
    """How to serve; built once in `main` from flags or environment.

    Attributes:
        host: Interface to bind gRPC and metrics on ("0.0.0.0" in containers).
        port: gRPC port; 0 picks a free one.
        metrics_port: Prometheus /metrics HTTP port; 0 picks a free one, None disables.
        max_workers: Threads serving RPCs.
        max_message_bytes: Max send and receive message size (gRPC's default is 4 MiB);
            at most 2**31 - 1, since gRPC's channel arguments are C ints.
        max_concurrent_rpcs: Beyond this many RPCs in flight, new ones get
            RESOURCE_EXHAUSTED; None means no limit.
        grace_seconds: How long `stop` lets in-flight RPCs finish.
        tls_cert: PEM certificate chain file; with `tls_key`, gRPC is served over TLS only.
        tls_key: PEM private key file of `tls_cert`.
    """

    host: Annotated[str, pydantic.Field(min_length=1)] = "127.0.0.1"
    port: Port = 0
    metrics_port: Port | None = 0
    max_workers: Annotated[int, pydantic.Field(ge=1)] = 16
    max_message_bytes: Annotated[int, pydantic.Field(ge=1, le=_INT32_MAX)] = 64 * 1024 * 1024
    max_concurrent_rpcs: Annotated[int, pydantic.Field(ge=1)] | None = None
    grace_seconds: Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)] = 5.0
    tls_cert: Annotated[str, pydantic.Field(min_length=1)] | None = None
    tls_key: Annotated[str, pydantic.Field(min_length=1)] | None = None

    @pydantic.model_validator(mode="after")
    def _ports_differ(self) -> ServerConfig:
        if self.metrics_port is not None and self.metrics_port == self.port != 0:
            raise ValueError(f"metrics_port: metrics_port and port are both {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: give both (TLS) or neither (plaintext)")
        return self

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the certificate and key files; None when serving plaintext.

        Raises:
            ConfigError: a file cannot be read.
        """
        if self.tls_cert is None or self.tls_key is None:
            return None
        pem = {}
        for what, path in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
            try:
                with open(path, "rb") as f:
                    pem[what] = f.read()
            except OSError as exc:
                raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
        return grpc.ssl_server_credentials([(pem["tls_key"], pem["tls_cert"])])


@dataclasses.dataclass(frozen=True)
class Service:
    """A gRPC service to serve, and how to add it to a server.

    Attributes:
        name: Full service name, e.g. "monolith.api.embedding_ps.v1.EmbeddingPS"; used
            for its health status and in reflection.
        register: Adds the servicer, e.g.
            `lambda s: pb2_grpc.add_EmbeddingPSServicer_to_server(servicer, s)`.
    """

    name: str
    register: Callable[[grpc.Server], None]


class _HealthServicer(health.HealthServicer):
    """The stock health servicer, with Watch answered from a worker thread.

    The stock non-blocking Watch deadlocks if a watcher hangs up while `set()` or
    `enter_graceful_shutdown()` runs: they send under the servicer's lock and wait for
    gRPC's event thread, which is waiting for that lock to close the cancelled Watch
    (grpc/grpc PR #43403, unreleased in 1.85). A blocking Watch only queues under the
    lock. grpc keeps the flag on the function, hence an override, not the stock class.
    """

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=False)

    def Watch(  # noqa: N802 (gRPC method name)
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> Any:
        return super().Watch(request, context)


def add_server_arguments(parser: argparse.ArgumentParser, port: int, metrics_port: int, tls: bool = False) -> None:
    """The flags every role's server takes: where to listen and how large messages may be.

    Args:
        parser: the role's argument parser.
        port: the role's default gRPC port.
        metrics_port: the role's default /metrics port.
        tls: also --tls-cert/--tls-key, for the roles product backends call (model-serving,
            the joiner): they carry user data from outside the cluster.
    """
    parser.add_argument("--host", default="0.0.0.0", help="interface to bind (default: all)")
    parser.add_argument("--port", type=int, default=port, help=f"gRPC port (default {port}; 0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, default=metrics_port,
                        help=f"Prometheus /metrics port (default {metrics_port}; 0 picks a free one)")  # fmt: skip
    parser.add_argument("--max-message-mb", type=_message_mb, default=64, help="max gRPC message size in MiB (1..2047)")
    if tls:
        parser.add_argument("--tls-cert", default=None,
                            help="PEM certificate chain: serve gRPC over TLS only (with --tls-key)")  # fmt: skip
        parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")


def _message_mb(text: str) -> int:
    """An argparse type: MiB that fit gRPC's message limit (a C int of bytes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    if not 1 <= value <= _INT32_MAX // (1024 * 1024):
        raise argparse.ArgumentTypeError(f"must be in 1..{_INT32_MAX // (1024 * 1024)} MiB, got {value}")
    return value


def server_config_from_args(args: argparse.Namespace, **fields: Any) -> ServerConfig:
    """The ServerConfig of `add_server_arguments`' flags, plus role-specific fields.

    Raises:
        ConfigError: a flag is out of range, named by its config field.
    """
    flags = {
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "max_message_bytes": args.max_message_mb * 1024 * 1024,
        "tls_cert": getattr(args, "tls_cert", None),
        "tls_key": getattr(args, "tls_key", None),
    }
    return parse_config(ServerConfig, {**flags, **fields})


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_can_listen(host: str, port: int, what: str) -> None:
    """Binds and releases a port first, so a busy one fails with one clear line.

    gRPC's own failure is an ERROR line from its C core plus "Failed to bind to address";
    a /metrics clash would otherwise surface only after the role has logged that it serves.
    (The port can still be taken in between: the real bind is checked as well.)

    Raises:
        ServerStartError: the port is in use or the host is not this machine's.
    """
    if port == 0:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            probe.bind((host, port))
    except OSError as exc:
        raise ServerStartError(f"cannot listen for {what} on {_host_port(host, port)}: {exc.strerror or exc}") from None


class MonolithServer:
    """A built gRPC server plus its health status and /metrics endpoint.

    Use `build_server` to make one. Tests use it as a context manager; `main` calls
    `run_until_signal`.
    """

    def __init__(
        self,
        server: grpc.Server,
        config: ServerConfig,
        port: int,
        service_names: Sequence[str],
        health_servicer: health.HealthServicer,
    ) -> None:
        self._server = server
        self._config = config
        self._service_names = tuple(service_names)
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._metrics_httpd: Any = None
        self.port: int = port
        self.metrics_port: int | None = None
        self.health: health.HealthServicer = health_servicer

    @property
    def address(self) -> str:
        """Where clients dial, "host:port"."""
        return _host_port(self._config.host, self.port)

    def start(self, serving: bool = True) -> None:
        """Starts /metrics (if enabled) and gRPC, then reports SERVING.

        Args:
            serving: the health to report; a component that must load state before taking
                traffic starts with False and calls `set_serving(True)` when ready.

        Raises:
            RuntimeError: The server was stopped; gRPC servers cannot restart.
            ServerStartError: The /metrics port could not be bound.
        """
        with self._lock:
            if self._stopped:
                raise RuntimeError("server was stopped; build a new one")
            if self._started:
                return
            if self._config.metrics_port is not None:
                where = _host_port(self._config.host, self._config.metrics_port)
                try:
                    self._metrics_httpd, self.metrics_port = metrics.start_metrics_http(
                        self._config.host, self._config.metrics_port
                    )
                except OSError as exc:
                    raise ServerStartError(f"cannot serve /metrics on {where}: {exc.strerror or exc}") from None
            tune_gc()
            self._server.start()
            self._started = True
        self.set_serving(serving)
        metrics_at = "disabled"
        if self.metrics_port is not None:
            metrics_at = f"http://{_host_port(self._config.host, self.metrics_port)}/metrics"
        _LOGGER.info("serving gRPC on %s, metrics %s", self.address, metrics_at)

    def set_serving(self, serving: bool) -> None:
        """Sets the health status of the whole server ("") and of every service.

        Ignored once `stop` has begun: health stays NOT_SERVING from then on.
        """
        status = health_pb2.HealthCheckResponse.NOT_SERVING
        if serving:
            status = health_pb2.HealthCheckResponse.SERVING
        for name in ("", *self._service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> bool:
        """Reports NOT_SERVING, drains in-flight RPCs, and closes /metrics. Idempotent.

        Returns within the grace period plus STOP_MARGIN_SECONDS, even if gRPC has not
        closed every call by then (that is logged).

        Args:
            grace: Seconds in-flight RPCs get before they are cancelled; defaults to
                `config.grace_seconds`.

        Returns:
            Whether gRPC closed every call in time (True if the server was already stopped).
        """
        with self._lock:
            if self._stopped:
                return True
            self._stopped = True
        self.health.enter_graceful_shutdown()
        grace = self._config.grace_seconds if grace is None else grace
        closed = self._server.stop(grace).wait(grace + STOP_MARGIN_SECONDS)
        if not closed:
            _LOGGER.warning(
                "gRPC on %s had calls open %.1f s after the %.1f s grace period; stopping without them",
                self.address, STOP_MARGIN_SECONDS, grace,
            )  # fmt: skip
        if self._metrics_httpd is not None:
            metrics.stop_metrics_http(self._metrics_httpd)
            self._metrics_httpd = None
        _LOGGER.info("stopped gRPC on %s", self.address)
        return closed

    def run_until_signal(self, on_shutdown: Callable[[], None] | None = None) -> None:
        """Serves until SIGTERM or SIGINT, then drains and calls `on_shutdown`.

        Starts the server if it is not started. After the first signal the previous
        handlers are restored, so a second Ctrl-C interrupts a slow drain.

        Args:
            on_shutdown: Runs after the server has stopped, e.g. to flush a checkpoint.

        Raises:
            RuntimeError: Not called from the main thread (Python delivers signals there).
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("run_until_signal must be called from the main thread")
        received: list[signal.Signals] = []
        wake = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            # Only record it: logging here could re-enter a handler the signal interrupted.
            received.append(signal.Signals(signum))
            wake.set()

        watched = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, on_signal) for sig in watched}
        try:
            self.start()
            wake.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        _LOGGER.info("received %s, shutting down", received[0].name)
        self.stop()
        if on_shutdown is not None:
            on_shutdown()

    def __enter__(self) -> MonolithServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def build_server(config: ServerConfig, services: Sequence[Service]) -> MonolithServer:
    """Builds an unstarted server with the services, health, reflection and metrics.

    The port is bound here, so `.port` is known before `start()`. Health reports
    NOT_SERVING for "" and every service until `start()`.

    Args:
        config: How to serve.
        services: The services to register; names must be unique.

    Returns:
        The server, ready to `start()`.

    Raises:
        ValueError: Two services share a name.
        ServerStartError: The port could not be bound.
    """
    names = [s.name for s in services]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate service names in {names}")
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # gRPC's Linux default lets a second server bind a busy port and silently share
        # its traffic; a clash must fail instead.
        ("grpc.so_reuseport", 0),
        *_KEEPALIVE_OPTIONS,
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix="grpc-worker"
        ),
        interceptors=[ErrorAndMetricsInterceptor()],
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    for service in services:
        service.register(server)

    health_servicer = _HealthServicer()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    _check_can_listen(config.host, config.port, "gRPC")
    if config.metrics_port is not None:
        _check_can_listen(config.host, config.metrics_port, "/metrics")
    where = _host_port(config.host, config.port)
    credentials = config.credentials()
    try:
        port = server.add_secure_port(where, credentials) if credentials else server.add_insecure_port(where)
    except RuntimeError:  # gRPC says only "Failed to bind to address"
        raise ServerStartError(
            f"cannot listen for gRPC on {where}: the port is in use or the address is not this host's"
        ) from None
    return MonolithServer(server, config, port, names, health_servicer)
