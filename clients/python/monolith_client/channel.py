"""The client's gRPC channels: message limits, keepalive and reconnection the monolith servers
accept (the same as the server package's own channel factory, which a test holds this to), and
TLS with the system's roots or a given CA, optionally with a client certificate."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence, Union

import grpc

MESSAGE_BYTES = 64 * 1024 * 1024  # the servers' default limit
OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    # Pings after 30 s idle find a peer gone without closing the connection; the servers
    # refuse pings more often than every 10 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted server is reached again within a second, not after gRPC's default backoff
    # of up to two minutes (retries of UNAVAILABLE rely on it).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class Tls:
    """How the client verifies a TLS server, and optionally proves who it is.

    Attributes:
        ca: PEM file of the certificate(s) to trust; None trusts the system's roots. A
            self-signed server certificate is its own CA.
        cert: PEM certificate chain of this client, for servers that ask for one (with `key`).
        key: PEM private key of `cert`.
        server_name: the name the server's certificate must carry when it is not the host
            dialed (e.g. "localhost" when dialing 127.0.0.1).
    """

    ca: Optional[PathLike] = None
    cert: Optional[PathLike] = None
    key: Optional[PathLike] = None
    server_name: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a TLS client certificate needs both tls_cert and tls_key")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials of the files.

        Raises:
            ValueError: a file cannot be read.
        """
        return grpc.ssl_channel_credentials(
            root_certificates=_read("tls_ca", self.ca), private_key=_read("tls_key", self.key),
            certificate_chain=_read("tls_cert", self.cert),
        )  # fmt: skip


def _read(what: str, path: Optional[PathLike]) -> Optional[bytes]:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {os.fspath(path)}: {exc.strerror or exc}") from None


def _options(tls: Optional[Tls]) -> list[tuple[str, Any]]:
    options = list(OPTIONS)
    if tls is not None and tls.server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def open_channel(address: str, tls: Optional[Tls] = None) -> grpc.Channel:
    """A channel to `address` ("host:port"), over TLS when `tls` is given."""
    if tls is None:
        return grpc.insecure_channel(address, options=_options(None))
    return grpc.secure_channel(address, tls.credentials(), options=_options(tls))


def open_aio_channel(address: str, tls: Optional[Tls] = None, interceptors: Sequence[Any] = ()) -> "grpc.aio.Channel":
    """The asyncio channel of `open_channel` (open it inside the event loop that uses it)."""
    import grpc.aio  # loaded with the asyncio client only (see monolith_client.__init__)

    chosen = list(interceptors) or None
    if tls is None:
        return grpc.aio.insecure_channel(address, options=_options(None), interceptors=chosen)
    return grpc.aio.secure_channel(address, tls.credentials(), options=_options(tls), interceptors=chosen)
