"""The client-side channel factory: the channel arguments each config gives, and its config errors."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from monolith.common import server
from monolith.common.channel import (
    DEFAULT,
    MIN_KEEPALIVE_SECONDS,
    UNLIMITED,
    ChannelConfig,
    TlsConfig,
    open_channel,
)
from monolith.common.config import parse_config
from monolith.common.errors import ConfigError

_RECONNECT = {"grpc.initial_reconnect_backoff_ms": 100, "grpc.min_reconnect_backoff_ms": 100,
              "grpc.max_reconnect_backoff_ms": 1000}  # fmt: skip


def test_the_default_is_64_mib_messages_keepalive_and_grpcs_own_backoff() -> None:
    options = dict(DEFAULT.options())

    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 64 * 2**20
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert not set(_RECONNECT) & set(options)
    assert "grpc.ssl_target_name_override" not in options
    assert len(options) == len(DEFAULT.options())  # no argument given twice


def test_fast_reconnect_unlimited_messages_and_no_keepalive() -> None:
    config = ChannelConfig(max_send_bytes=UNLIMITED, max_receive_bytes=UNLIMITED, fast_reconnect=True,
                           keepalive_seconds=None)  # fmt: skip

    options = dict(config.options())

    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == -1
    assert {k: options[k] for k in _RECONNECT} == _RECONNECT
    assert not any(k.startswith("grpc.keepalive") for k in options)


def test_keepalive_pings_stay_within_what_the_servers_accept() -> None:
    accepted_ms = dict(server._KEEPALIVE_OPTIONS)["grpc.http2.min_ping_interval_without_data_ms"]
    assert MIN_KEEPALIVE_SECONDS * 1000 > accepted_ms

    with pytest.raises(ConfigError, match="keepalive_seconds: input should be greater than or equal to 15"):
        parse_config(ChannelConfig, {"keepalive_seconds": 10.0})
    fastest = ChannelConfig(keepalive_seconds=MIN_KEEPALIVE_SECONDS)
    assert dict(fastest.options())["grpc.keepalive_time_ms"] == 15_000


@pytest.mark.parametrize("limit", [0, -2, 2**31])
def test_message_limits_are_minus_one_or_a_c_int(limit: int) -> None:
    message = f"max_receive_bytes: must be -1 \\(unlimited\\) or 1..2147483647 bytes, got {limit}"
    with pytest.raises(ConfigError, match=message):
        parse_config(ChannelConfig, {"max_receive_bytes": limit})


def test_tls_server_name_overrides_the_target_name() -> None:
    options = dict(ChannelConfig(tls=TlsConfig(server_name="localhost")).options())

    assert options["grpc.ssl_target_name_override"] == "localhost"


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(pydantic.ValidationError, match="give both"):
        TlsConfig(cert="client.crt")


@pytest.mark.parametrize("field", ["ca", "cert"])
def test_an_unreadable_tls_file_is_a_config_error_naming_it(field: str, tmp_path: Path) -> None:
    present = tmp_path / "present.pem"
    present.write_text("not checked before the handshake")
    missing = str(tmp_path / "missing.pem")
    files = {"ca": str(present), "cert": str(present), "key": str(present), field: missing}
    config = ChannelConfig(tls=TlsConfig(**files))

    with pytest.raises(ConfigError, match=f"tls.{field}: cannot read {missing}: No such file or directory"):
        open_channel("127.0.0.1:1", config)


def test_a_plaintext_channel_opens_lazily() -> None:
    with open_channel("127.0.0.1:1") as channel:  # nothing listens; no call is made
        assert channel is not None
