"""Where the streams live and their limits; subjects and partitions."""

from __future__ import annotations

import argparse
import hashlib
import ssl
from typing import Annotated

import pydantic
from pydantic import Field

from monolith.common.config import ConfigModel, parse_config
from monolith.common.errors import ConfigError

EVENTS_STREAM = "EVENTS"
SAMPLES_STREAM = "SAMPLES"
DAY = 86_400.0


class StreamsConfig(ConfigModel):
    """The NATS server and the JetStream streams' limits.

    Attributes:
        url: NATS server URL(s), comma-separated.
        partitions: P, the number of partitions of both streams. Fixed for a stream's life:
            it decides which partition a request_id falls in.
        replicas: copies of each stream (3 in a NATS cluster, 1 on one server).
        events_max_age: seconds EVENTS keeps a message; at least the join window plus the
            longest joiner restart.
        events_max_bytes: bytes EVENTS keeps (oldest dropped first).
        samples_max_age: seconds SAMPLES keeps a message; at least the longest trainer
            outage plus the checkpoint interval.
        samples_max_bytes: bytes SAMPLES keeps.
        duplicate_window: seconds JetStream remembers message ids to drop a re-publish.
        timeout: seconds one publish or stream request may take.
        tls_ca: PEM file of the CA that signed the NATS server's certificate: connect over
            TLS, verifying the server against it (None: plaintext, unless the server asks for
            TLS, which is then verified against the system's roots).
        tls_cert: PEM client certificate, for a server that verifies its clients (with `tls_key`).
        tls_key: PEM private key of `tls_cert`.
        tls_server_name: the name the server's certificate carries, when not the URL's host.
    """

    url: str = "nats://127.0.0.1:4222"
    partitions: Annotated[int, Field(ge=1, le=1024)] = 8
    replicas: Annotated[int, Field(ge=1, le=5)] = 1
    events_max_age: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 7 * DAY
    events_max_bytes: Annotated[int, Field(ge=1 << 20)] = 4 << 30
    samples_max_age: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 7 * DAY
    samples_max_bytes: Annotated[int, Field(ge=1 << 20)] = 4 << 30
    duplicate_window: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 120.0
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 5.0
    tls_ca: Annotated[str, Field(min_length=1)] | None = None
    tls_cert: Annotated[str, Field(min_length=1)] | None = None
    tls_key: Annotated[str, Field(min_length=1)] | None = None
    tls_server_name: Annotated[str, Field(min_length=1)] | None = None

    @pydantic.model_validator(mode="after")
    def _cert_with_key(self) -> StreamsConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("NATS tls_cert and tls_key: give both (a client certificate) or neither")
        return self

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the NATS connection (None: plaintext).

        Raises:
            ConfigError: a file cannot be read or is not PEM.
        """
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert is not None:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"NATS TLS files ({self.tls_ca}, {self.tls_cert}): {exc}") from None
        return context


def partition_of(request_id: str, partitions: int) -> int:
    """The partition of a request_id: a stable hash (the same in every process and release)."""
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % partitions


def events_subject(partition: int) -> str:
    return f"events.{partition}"


def samples_subject(partition: int) -> str:
    return f"samples.{partition}"


def add_streams_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags every role that touches the streams shares."""
    defaults = StreamsConfig()
    parser.add_argument("--nats", required=required, default=None if required else "",
                        help="NATS server URL(s), comma-separated, e.g. nats://127.0.0.1:4222"
                        + ("" if required else " (empty: off)"))  # fmt: skip
    parser.add_argument("--partitions", type=int, default=defaults.partitions,
                        help=f"partitions of the EVENTS and SAMPLES streams (default {defaults.partitions})")  # fmt: skip
    parser.add_argument("--stream-replicas", type=int, default=defaults.replicas,
                        help=f"copies of each stream, 3 in a NATS cluster (default {defaults.replicas})")  # fmt: skip
    for stream in ("events", "samples"):
        parser.add_argument(f"--{stream}-max-age", type=float, default=getattr(defaults, f"{stream}_max_age"),
                            help=f"seconds the {stream.upper()} stream keeps a message (default "
                            f"{getattr(defaults, f'{stream}_max_age'):g})")  # fmt: skip
        parser.add_argument(f"--{stream}-max-bytes", type=int, default=getattr(defaults, f"{stream}_max_bytes"),
                            help=f"bytes the {stream.upper()} stream keeps, oldest dropped first (default "
                            f"{getattr(defaults, f'{stream}_max_bytes')})")  # fmt: skip
    parser.add_argument("--duplicate-window", type=float, default=defaults.duplicate_window,
                        help="seconds the streams remember message ids to drop re-publishes "
                        f"(default {defaults.duplicate_window:g})")  # fmt: skip
    parser.add_argument("--nats-tls-ca", default=None,
                        help="PEM CA certificate of the NATS server's: connect over TLS, verified against it")  # fmt: skip
    parser.add_argument("--nats-tls-cert", default=None,
                        help="PEM client certificate, for a NATS server that verifies clients (with --nats-tls-key)")  # fmt: skip
    parser.add_argument("--nats-tls-key", default=None, help="PEM private key of --nats-tls-cert")
    parser.add_argument("--nats-tls-server-name", default=None,
                        help="the name the NATS server's certificate carries, when not the URL's host")  # fmt: skip


def streams_config_from_args(args: argparse.Namespace) -> StreamsConfig:
    return parse_config(
        StreamsConfig,
        {
            "url": args.nats,
            "partitions": args.partitions,
            "replicas": args.stream_replicas,
            "events_max_age": args.events_max_age,
            "events_max_bytes": args.events_max_bytes,
            "samples_max_age": args.samples_max_age,
            "samples_max_bytes": args.samples_max_bytes,
            "duplicate_window": args.duplicate_window,
            "tls_ca": args.nats_tls_ca,
            "tls_cert": args.nats_tls_cert,
            "tls_key": args.nats_tls_key,
            "tls_server_name": args.nats_tls_server_name,
        },
    )
