"""The one client-side channel factory: every gRPC channel a monolith client opens is made here.

It is the client's half of `common/server.py`'s `build_server`: message limits, keepalive
pings at an interval the servers accept, a reconnect backoff for peers that restart, and
TLS when the server serves it. Callers say what they need in a `ChannelConfig` and call
`open_channel`; no caller lists gRPC channel arguments itself.
"""

from __future__ import annotations

from typing import Annotated, Any

import grpc
import pydantic

from monolith.common.config import ConfigModel
from monolith.common.errors import ConfigError

_INT32_MAX = 2**31 - 1  # gRPC channel arguments are C ints
UNLIMITED = -1
"""A message limit of no limit (gRPC's own spelling)."""

DEFAULT_MESSAGE_BYTES = 64 * 1024 * 1024  # the servers' default limit (ServerConfig.max_message_bytes)

# Our servers accept a client ping every 10 s without data (common/server.py); pinging
# more often gets a GOAWAY "too_many_pings" and the connection is dropped. The margin
# keeps a ping that arrives a little early (timers, the network) from counting as abuse.
SERVER_MIN_PING_SECONDS = 10.0
MIN_KEEPALIVE_SECONDS = 1.5 * SERVER_MIN_PING_SECONDS
KEEPALIVE_TIMEOUT_MS = 10_000  # no ping answer within this: the connection is dead

# A peer that restarts is reached again within about a second: gRPC's default backoff
# grows to 120 s, during which every call fails fast although the peer is back.
_FAST_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def _message_limit(value: int) -> int:
    if value != UNLIMITED and not 1 <= value <= _INT32_MAX:
        raise ValueError(f"must be -1 (unlimited) or 1..{_INT32_MAX} bytes, got {value}")
    return value


MessageLimit = Annotated[int, pydantic.AfterValidator(_message_limit)]
_Path = Annotated[str, pydantic.Field(min_length=1)]


class TlsConfig(ConfigModel):
    """How a client verifies a TLS server (and, optionally, proves who it is).

    Attributes:
        ca: PEM file of the root certificate(s) to trust; None trusts the system's roots.
            A self-signed server certificate is its own root.
        cert: PEM certificate chain of this client, for servers that ask for one (with `key`).
        key: PEM private key of `cert`.
        server_name: the name to check the server's certificate against, instead of the
            host in the address; for tests that dial 127.0.0.1 with a certificate for
            "localhost".
    """

    ca: _Path | None = None
    cert: _Path | None = None
    key: _Path | None = None
    server_name: Annotated[str, pydantic.Field(min_length=1)] | None = None

    @pydantic.model_validator(mode="after")
    def _cert_with_key(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls cert and key: give both (a client certificate) or neither")
        return self

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials of the files.

        Raises:
            ConfigError: a file cannot be read.
        """
        pem = {what: _read(what, path) for what, path in (("ca", self.ca), ("cert", self.cert), ("key", self.key))}
        return grpc.ssl_channel_credentials(
            root_certificates=pem["ca"], private_key=pem["key"], certificate_chain=pem["cert"]
        )


def _read(what: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"tls.{what}: cannot read {path}: {exc.strerror or exc}") from None


class ChannelConfig(ConfigModel):
    """How a client's channel to one server behaves; the defaults suit a call-and-answer client.

    Attributes:
        max_send_bytes: the largest message this client sends; -1 means no limit.
        max_receive_bytes: the largest message it accepts; -1 means no limit (for
            streams whose chunk size the request bounds, such as Export).
        keepalive_seconds: ping the server after this long without activity, so a peer
            gone without closing the connection (a lost node) is noticed and calls fail
            instead of waiting out their deadline; None sends no pings. At least 15 s:
            the servers refuse pings more frequent than every 10 s.
        fast_reconnect: after a lost connection, retry within 100 ms, backing off to at
            most 1 s, for clients that must reach a restarted peer quickly (the sync, the
            trainers, the controller).
        tls: dial over TLS, verifying the server as this says; None dials plaintext.
    """

    max_send_bytes: MessageLimit = DEFAULT_MESSAGE_BYTES
    max_receive_bytes: MessageLimit = DEFAULT_MESSAGE_BYTES
    keepalive_seconds: Annotated[float, pydantic.Field(ge=MIN_KEEPALIVE_SECONDS, allow_inf_nan=False)] | None = 30.0
    fast_reconnect: bool = False
    tls: TlsConfig | None = None

    def options(self) -> list[tuple[str, Any]]:
        """The gRPC channel arguments of this config (TLS aside: that is `credentials`)."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_send_bytes),
            ("grpc.max_receive_message_length", self.max_receive_bytes),
        ]
        if self.keepalive_seconds is not None:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                # Idle channels too: a serving process's channel to a shard is idle between bursts.
                ("grpc.keepalive_permit_without_calls", 1),
                # The client's own cap on pings without data (2 by default) would stop the
                # pings of an idle channel after two; the servers accept them (see above).
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if self.fast_reconnect:
            options += _FAST_RECONNECT_OPTIONS
        if self.tls is not None and self.tls.server_name is not None:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options


DEFAULT = ChannelConfig()
"""Plaintext, 64 MiB messages, keepalive, gRPC's own reconnect backoff."""


def open_channel(address: str, config: ChannelConfig = DEFAULT) -> grpc.Channel:
    """A channel to `address` ("host:port") as `config` says; close it (or use `with`) when done.

    gRPC connects lazily: opening a channel to a server that is down succeeds, and the
    first call fails (UNAVAILABLE) or waits for it, as its deadline allows.

    Args:
        address: where the server listens.
        config: limits, keepalive, reconnect backoff and TLS.

    Raises:
        ConfigError: a TLS file cannot be read.
    """
    options = config.options()
    if config.tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, config.tls.credentials(), options=options)
