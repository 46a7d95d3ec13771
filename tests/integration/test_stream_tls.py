"""NATS over TLS: a nats-server that requires it (`NatsServer(tls=...)`, `monolith up --tls-cert`),
clients that verify it (StreamsConfig.tls_ca, every role's --nats-tls-* flags), and what a wrong
or missing CA does: one clear Unavailable, fast, not a connection retried forever."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator

import pydantic
import pytest

from helpers.streams import publish
from helpers.tls import HAVE_OPENSSL, self_signed
from monolith.common.errors import ConfigError, Unavailable
from monolith.streams.config import SAMPLES_STREAM, StreamsConfig, add_streams_arguments, streams_config_from_args
from monolith.streams.jetstream import connect
from monolith.streams.nats_server import NatsServer
from monolith.streams.publish import Message
from monolith.streams.readback import read_stream

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make a test certificate")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(tmp_path, certificate) -> Iterator[NatsServer]:
    with NatsServer(str(tmp_path / "nats"), log_path=str(tmp_path / "nats.log"), tls=certificate) as started:
        yield started


def _connects(config: StreamsConfig) -> None:
    async def main() -> None:
        client = await connect(config, "test-tls", attempts=2)
        await client.close()

    asyncio.run(main())


def test_a_client_that_trusts_the_servers_ca_publishes_and_reads_over_tls(server, certificate) -> None:
    config = StreamsConfig(url=server.url, partitions=2, tls_ca=certificate[0], tls_server_name="localhost")
    publish(config, [Message("samples.1", b"over tls", "tls/1")], SAMPLES_STREAM)
    [stored] = read_stream(config, SAMPLES_STREAM)
    assert (stored.subject, stored.data) == ("samples.1", b"over tls")


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({}, "self-signed certificate"),  # plaintext: the server asks for TLS, the system's roots do not trust it
        ({"tls_ca": "CA"}, "not valid for '127.0.0.1'"),  # the certificate names localhost
    ],
    ids=["no CA", "wrong name"],
)
def test_a_client_that_cannot_verify_the_server_fails_at_once_with_why(server, certificate, settings, reason) -> None:
    settings = {k: certificate[0] if v == "CA" else v for k, v in settings.items()}
    started = time.monotonic()
    with pytest.raises(Unavailable, match=reason):
        _connects(StreamsConfig(url=server.url, **settings))
    assert time.monotonic() - started < 30  # two attempts, not nats-py's endless reconnects


def test_with_several_servers_a_tls_failure_ends_the_attempt_too(server) -> None:
    # A cluster's URLs (the chart passes one per NATS pod): nats-py would hang after the first
    # failed handshake rather than try the next server.
    both = f"{server.url},{server.url.replace('127.0.0.1', 'localhost')}"
    started = time.monotonic()
    with pytest.raises(Unavailable, match="TLS failed: .*CERTIFICATE_VERIFY_FAILED"):
        _connects(StreamsConfig(url=both))
    assert time.monotonic() - started < 30


def test_a_client_set_to_verify_tls_refuses_a_plaintext_server(tmp_path, certificate) -> None:
    with NatsServer(str(tmp_path / "plain"), log_path=str(tmp_path / "plain.log")) as plain:
        with pytest.raises(Unavailable, match="does not require TLS"):
            _connects(StreamsConfig(url=plain.url, tls_ca=certificate[0]))


def test_a_cancelled_connect_leaves_no_attempt_behind() -> None:
    async def main() -> int:
        waiting = asyncio.ensure_future(connect(StreamsConfig(url="nats://127.0.0.1:1"), "test-cancel", attempts=0))
        await asyncio.sleep(1.0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return len(asyncio.all_tasks()) - 1  # all but this one

    assert asyncio.run(main()) == 0


def test_tls_settings_are_checked(tmp_path, certificate) -> None:
    with pytest.raises(ConfigError, match="NATS TLS files"):
        StreamsConfig(tls_ca=str(tmp_path / "missing.pem")).ssl_context()
    with pytest.raises(pydantic.ValidationError, match="give both"):
        StreamsConfig(tls_cert=certificate[0])
    assert StreamsConfig().ssl_context() is None


def test_every_streams_role_takes_the_nats_tls_flags(certificate) -> None:
    parser = argparse.ArgumentParser()
    add_streams_arguments(parser)
    args = parser.parse_args(["--nats", "nats://n:4222", "--nats-tls-ca", certificate[0], "--nats-tls-cert",
                              certificate[0], "--nats-tls-key", certificate[1], "--nats-tls-server-name", "nats"])  # fmt: skip
    config = streams_config_from_args(args)
    assert (config.tls_ca, config.tls_cert, config.tls_key, config.tls_server_name) == (
        certificate[0], certificate[0], certificate[1], "nats")  # fmt: skip
    assert config.ssl_context() is not None
