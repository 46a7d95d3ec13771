"""ServerConfig rejects values that would fail later, naming the field."""

from __future__ import annotations

import argparse

import pydantic
import pytest

from monolith.common.config import positive_seconds, seconds
from monolith.common.errors import ConfigError
from monolith.common.server import ServerConfig, add_server_arguments, server_config_from_args


def test_defaults_are_valid() -> None:
    config = ServerConfig()

    assert (config.host, config.port, config.metrics_port) == ("127.0.0.1", 0, 0)
    assert config.max_message_bytes == 64 * 1024 * 1024


def test_is_frozen() -> None:
    with pytest.raises(pydantic.ValidationError):
        ServerConfig().port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"host": ""}, "host"),
        ({"port": -1}, "port"),
        ({"port": 65536}, "port"),
        ({"metrics_port": -1}, "metrics_port"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"port": 8500, "metrics_port": 8500}, "metrics_port"),
        ({"max_workers": 0}, "max_workers"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
        ({"max_message_bytes": 2**31}, "max_message_bytes"),
        ({"max_concurrent_rpcs": 0}, "max_concurrent_rpcs"),
        ({"grace_seconds": -0.1}, "grace_seconds"),
    ],
)
def test_invalid_values_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ServerConfig(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": 65535, "metrics_port": None},
        {"port": 0, "metrics_port": 0},
        {"max_message_bytes": 2**31 - 1},
        {"max_concurrent_rpcs": 1},
        {"grace_seconds": 0.0},
    ],
)
def test_edge_values_are_accepted(overrides: dict[str, object]) -> None:
    ServerConfig(**overrides)  # type: ignore[arg-type]


def test_flags_out_of_range_are_a_config_error_naming_the_field() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, port=50051, metrics_port=9090)
    args = parser.parse_args(["--port", "70000"])

    with pytest.raises(ConfigError) as info:
        server_config_from_args(args)

    assert "port: input should be less than or equal to 65535, got 70000" in str(info.value)


@pytest.mark.parametrize("mb", ["0", "4096", "1.5"])
def test_a_message_limit_out_of_range_names_the_flag(mb: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, port=50051, metrics_port=9090)

    with pytest.raises(SystemExit):
        parser.parse_args(["--max-message-mb", mb])

    assert "--max-message-mb" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "soon"])
def test_interval_flags_refuse_what_would_break_a_periodic_task(text: str) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=positive_seconds)
    parser.add_argument("--sweep", type=seconds)

    for flag in ("--every", "--sweep"):
        with pytest.raises(SystemExit) as info:
            parser.parse_args([flag, text])
        assert info.value.code == 2


def test_interval_flags_take_finite_seconds() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=positive_seconds)
    parser.add_argument("--sweep", type=seconds)

    args = parser.parse_args(["--every", "0.5", "--sweep", "0"])

    assert (args.every, args.sweep) == (0.5, 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--every", "0"])
