"""What the local stack runs: each part's command line, ports, readiness probe and dependencies.

The stack is ten processes on loopback: nats-server (JetStream), two training
embedding-PS shards, two serving shards that follow them, the dense-PS, the joiner, the
checkpoint controller, one online trainer and model-serving. The training shards and the
dense-PS start (and restart) awaiting a restore: the controller restores them from the
last checkpoint (empty on a new stack), rolls the trainer back to it, and only then lets
it train, so a SIGKILLed shard comes back with its rows and serving never follows it empty. Ports are chosen once, before anything starts, so a part
restarted after a crash comes back where its clients expect it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Iterable, Sequence

from monolith.common.channel import TlsConfig
from monolith.harness.manifest import DEFAULT_CONSUMER
from monolith.harness.stack.health import GrpcAnswers, GrpcHealth, HttpOk, Probe
from monolith.serving.embedding_cache import CacheConfig
from monolith.streams.nats_server import NatsServer

HOST = "127.0.0.1"
SHARDS = 2  # embedding-PS shards per role (training, serving)

NATS = "nats"
DENSE_PS = "dense-ps"
JOINER = "joiner"
TRAINER = "trainer"
SERVING = "serving"
CONTROLLER = "controller"


def training_shard(index: int) -> str:
    return f"embedding-ps-training-{index}"


def serving_shard(index: int) -> str:
    return f"embedding-ps-serving-{index}"


@dataclasses.dataclass(frozen=True)
class Part:
    """One process of the stack.

    Attributes:
        name: its name in messages, log file names (`<name>.log`) and stack.json.
        argv: its full command line.
        probe: how to tell it is ready.
        address: where clients reach it ("127.0.0.1:port" for gRPC, the URL for NATS),
            or None for a part nothing calls (the trainer).
        metrics: its Prometheus /metrics URL, or None.
        after: the parts that must be ready before it starts.
    """

    name: str
    argv: tuple[str, ...]
    probe: Probe
    address: str | None = None
    metrics: str | None = None
    after: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A server's two ports: gRPC (the NATS client port for nats-server) and metrics
    (nats-server's monitoring port)."""

    port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"


@dataclasses.dataclass(frozen=True)
class StackPorts:
    """Every port of the stack, all distinct."""

    nats: Endpoint
    training: tuple[Endpoint, ...]
    serving_shards: tuple[Endpoint, ...]
    dense_ps: Endpoint
    joiner: Endpoint
    trainer_metrics: int
    serving: Endpoint
    trainer_control: int = 0
    controller: Endpoint | None = None

    @property
    def nats_url(self) -> str:
        return f"nats://{HOST}:{self.nats.port}"

    def all(self) -> list[int]:
        ports = [self.trainer_metrics, *([self.trainer_control] if self.trainer_control else [])]
        for e in (self.nats, *self.training, *self.serving_shards, self.dense_ps, self.joiner, self.serving,
                  *([self.controller] if self.controller else [])):  # fmt: skip
            ports += [e.port, e.metrics_port]
        return ports


class _PortPicker:
    """Hands out free loopback ports, never one twice nor one reserved for a fixed flag.

    A port is free when picked; the process that binds it starts moments later (the OS
    could give it away in between, which `monolith up` reports as that part failing).
    """

    def __init__(self, reserved: Iterable[int]) -> None:
        self._taken = {p for p in reserved if p}

    def port(self, requested: int = 0) -> int:
        if requested:
            return requested
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = int(s.getsockname()[1])
            if port not in self._taken:
                self._taken.add(port)
                return port

    def endpoint(self, requested: int = 0) -> Endpoint:
        return Endpoint(self.port(requested), self.port())


def allocate_ports(nats_port: int = 0, joiner_port: int = 0, serving_port: int = 0) -> StackPorts:
    """The stack's ports: the given ones where not 0, free ones for the rest.

    Raises:
        ValueError: two of the given ports are the same.
    """
    fixed = [p for p in (nats_port, joiner_port, serving_port) if p]
    if len(set(fixed)) != len(fixed):
        raise ValueError(f"--nats-port, --joiner-port and --serving-port must differ, got {fixed}")
    pick = _PortPicker(fixed)
    return StackPorts(
        nats=pick.endpoint(nats_port),
        training=tuple(pick.endpoint() for _ in range(SHARDS)),
        serving_shards=tuple(pick.endpoint() for _ in range(SHARDS)),
        dense_ps=pick.endpoint(),
        joiner=pick.endpoint(joiner_port),
        trainer_metrics=pick.port(),
        serving=pick.endpoint(serving_port),
        trainer_control=pick.port(),
        controller=pick.endpoint(),
    )


@dataclasses.dataclass(frozen=True)
class StackSettings:
    """What `monolith up` was asked for (flags, resolved).

    Attributes:
        data_dir: absolute; JetStream's store is `<data_dir>/nats`.
        config: absolute path of the model config every role reads.
        partitions: partitions of the EVENTS and SAMPLES streams.
        sync_interval: seconds between train-to-serve syncs, of the embeddings (serving
            shards from training shards) and of the dense parameters (model-serving);
            model-serving's embedding cache refreshes four times as often (at most at its
            own default), so the cache adds little to what the sync itself leaves stale.
        log_level: every role's --log-level.
        python: the interpreter that runs the roles.
        join_window: the joiner's --window (event-time seconds); None: the joiner's default.
        join_lateness: the joiner's --lateness (event-time seconds); None: the joiner's default.
        checkpoint_interval: the controller's --interval (seconds between checkpoints).
        trainer_consumer: the durable consumer the online trainer reads SAMPLES with, and
            whose position the controller checkpoints.
        tls_cert: PEM certificate chain model-serving and the joiner serve TLS with (with
            `tls_key`); None: plaintext.
        tls_key: its private key.
        tls_server_name: the name the certificate carries, checked when dialing 127.0.0.1.
    """

    data_dir: str
    config: str
    partitions: int = 8
    sync_interval: float = 1.0
    log_level: str = "INFO"
    python: str = sys.executable
    join_window: float | None = None
    join_lateness: float | None = None
    checkpoint_interval: float = 30.0
    trainer_consumer: str = DEFAULT_CONSUMER
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str = "localhost"

    @property
    def tls(self) -> TlsConfig | None:
        """How a client of model-serving and the joiner verifies them (None: plaintext)."""
        return None if self.tls_cert is None else TlsConfig(ca=self.tls_cert, server_name=self.tls_server_name)

    @property
    def nats_dir(self) -> str:
        return os.path.join(self.data_dir, "nats")

    @property
    def checkpoints_dir(self) -> str:
        return os.path.join(self.data_dir, "checkpoints")

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.data_dir, "logs")


def cache_refresh(sync_interval: float) -> float:
    """Model-serving's `--embedding-cache-refresh` under a sync every `sync_interval` seconds."""
    return min(CacheConfig().refresh_seconds, sync_interval / 4)


def stack_parts(settings: StackSettings, ports: StackPorts) -> list[Part]:
    """Every part, each after the parts it needs (a valid start order).

    Model-serving comes last: it reports SERVING only once dense parameters exist, which
    the trainer creates when it starts.
    """
    s = settings

    def role(name: str, *args: str) -> tuple[str, ...]:
        return (s.python, "-m", "monolith.cli", "--log-level", s.log_level, name, *args)

    def server(endpoint: Endpoint) -> tuple[str, ...]:
        return ("--host", HOST, "--port", str(endpoint.port), "--metrics-port", str(endpoint.metrics_port))

    def grpc_part(name: str, endpoint: Endpoint, argv: tuple[str, ...], after: Sequence[str] = (),
                  tls: TlsConfig | None = None) -> Part:  # fmt: skip
        return Part(name, argv, GrpcHealth(endpoint.address, tls), endpoint.address, endpoint.metrics_url, tuple(after))

    # Model-serving and the joiner: the roles product backends call, over TLS when given a certificate.
    tls = ("--tls-cert", s.tls_cert, "--tls-key", s.tls_key) if s.tls_cert and s.tls_key else ()

    nats = NatsServer(s.nats_dir, ports.nats.port, ports.nats.metrics_port,
                      tls=(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None)  # fmt: skip
    parts = [
        Part(
            NATS,
            tuple(nats.args()),
            HttpOk(f"http://{HOST}:{ports.nats.metrics_port}/healthz?js-enabled-only=true"),
            ports.nats_url,
        )
    ]
    training = [training_shard(i) for i in range(SHARDS)]
    for i, endpoint in enumerate(ports.training):
        shard = ("--shard", str(i), "--num-shards", str(SHARDS), "--config", s.config)
        argv = role("embedding-ps", *shard, "--role", "training", "--restore-required", *server(endpoint))
        # Up once it answers: it reports SERVING only after the controller has restored it.
        parts.append(Part(training[i], argv, GrpcAnswers(endpoint.address), endpoint.address, endpoint.metrics_url))
    for i, endpoint in enumerate(ports.serving_shards):
        shard = ("--shard", str(i), "--num-shards", str(SHARDS), "--config", s.config)
        follow = ("--sync-from", ports.training[i].address, "--sync-interval", f"{s.sync_interval:g}")
        argv = role("embedding-ps", *shard, "--role", "serving", *follow, *server(endpoint))
        parts.append(grpc_part(serving_shard(i), endpoint, argv, after=[training[i]]))
    argv = role("dense-ps", "--config", s.config, "--restore-required", *server(ports.dense_ps))
    parts.append(Part(DENSE_PS, argv, GrpcAnswers(ports.dense_ps.address), ports.dense_ps.address,
                      ports.dense_ps.metrics_url))  # fmt: skip
    streams = ("--nats", ports.nats_url, "--partitions", str(s.partitions))
    if s.tls_cert:  # NATS serves TLS with the same certificate: every role verifies it
        streams += ("--nats-tls-ca", s.tls_cert, "--nats-tls-server-name", s.tls_server_name)
    join = ("--window", f"{s.join_window:g}") if s.join_window is not None else ()
    join += ("--lateness", f"{s.join_lateness:g}") if s.join_lateness is not None else ()
    argv = role("joiner", *streams, "--config", s.config, *join, *server(ports.joiner), *tls)
    parts.append(grpc_part(JOINER, ports.joiner, argv, after=[NATS], tls=s.tls))
    if ports.controller is not None:
        argv = role(
            "controller", "--storage", s.checkpoints_dir, "--interval", f"{s.checkpoint_interval:g}",
            "--embedding-ps", ",".join(e.address for e in ports.training), "--dense-ps", ports.dense_ps.address,
            "--trainers", f"{HOST}:{ports.trainer_control}", "--consumer", s.trainer_consumer, *streams,
            *server(ports.controller),
        )  # fmt: skip
        # SERVING once it has restored (or adopted) the training shards and the dense-PS.
        parts.append(grpc_part(CONTROLLER, ports.controller, argv, after=[NATS, *training, DENSE_PS]))
    trainer_metrics = Endpoint(0, ports.trainer_metrics).metrics_url
    argv = role(
        "trainer", "--mode", "online", *streams, "--consumer", s.trainer_consumer, "--config", s.config,
        "--embedding-ps", ",".join(e.address for e in ports.training), "--dense-ps", ports.dense_ps.address,
        "--host", HOST, "--metrics-port", str(ports.trainer_metrics),
    )  # fmt: skip
    trainer_after: tuple[str, ...] = (NATS, *training, DENSE_PS)
    if ports.controller is not None:
        # Paused until the controller has checked it in (and rolled back what a predecessor
        # that died mid-step left half applied).
        argv += ("--control-port", str(ports.trainer_control), "--start-paused")
        trainer_after += (CONTROLLER,)
    # It is up once its /metrics answers.
    parts.append(Part(TRAINER, argv, HttpOk(trainer_metrics), None, trainer_metrics, trainer_after))
    argv = role(
        "serving", "--config", s.config,
        "--embedding-ps", ",".join(e.address for e in ports.serving_shards), "--dense-ps", ports.dense_ps.address,
        *streams, "--dense-sync-interval", f"{s.sync_interval:g}", *server(ports.serving),
        "--embedding-cache-refresh", f"{cache_refresh(s.sync_interval):g}", *tls,
    )  # fmt: skip
    serving_after = (NATS, *(serving_shard(i) for i in range(SHARDS)), DENSE_PS, TRAINER)
    parts.append(grpc_part(SERVING, ports.serving, argv, after=serving_after, tls=s.tls))
    return parts
