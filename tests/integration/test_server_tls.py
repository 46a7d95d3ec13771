"""gRPC over TLS (the Predict endpoint's `--tls-cert`/`--tls-key`): the server factory's secure port."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monolith.common.errors import ConfigError
from monolith.common.server import ServerConfig, build_server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for localhost and its key (PEM files)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "tls.crt"), str(directory / "tls.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_a_tls_server_answers_over_tls_and_refuses_plaintext(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    server = build_server(ServerConfig(metrics_port=None, tls_cert=cert, tls_key=key), [])
    server.start()
    try:
        with open(cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(
            f"127.0.0.1:{server.port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_tls_needs_both_files_and_readable_ones(certificate: tuple[str, str], tmp_path) -> None:
    cert, _ = certificate
    with pytest.raises(ValueError, match="give both"):
        ServerConfig(tls_cert=cert)
    with pytest.raises(ConfigError, match="tls_key: cannot read"):
        build_server(ServerConfig(metrics_port=None, tls_cert=cert, tls_key=str(tmp_path / "missing.key")), [])
