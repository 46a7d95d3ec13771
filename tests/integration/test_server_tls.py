"""gRPC over TLS (the Predict endpoint's `--tls-cert`/`--tls-key`): the server factory's secure port."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from monolith_client import MonolithClient, PredictError
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from helpers.tls import HAVE_OPENSSL, self_signed
from monolith.common.channel import ChannelConfig, TlsConfig, open_channel
from monolith.common.errors import ConfigError
from monolith.common.server import ServerConfig, Service, build_server

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl is needed to make a test certificate")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for localhost and its key (PEM files)."""
    return self_signed(tmp_path_factory.mktemp("tls"))


def test_a_tls_server_answers_over_tls_and_refuses_plaintext(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    server = build_server(ServerConfig(metrics_port=None, tls_cert=cert, tls_key=key), [])
    server.start()
    try:
        tls = ChannelConfig(tls=TlsConfig(ca=cert, server_name="localhost"))
        with open_channel(f"127.0.0.1:{server.port}", tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with open_channel(f"127.0.0.1:{server.port}") as channel:
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


class _Scores(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A Predict endpoint that scores every example 0.25."""

    def Predict(  # noqa: N802 (gRPC method name)
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        batch = max(t.tensor_shape.dim[0].size for t in request.inputs.values())
        response = predict_pb2.PredictResponse()
        response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.full(batch, 0.25, np.float32)))
        return response


def test_the_python_client_scores_over_tls(certificate: tuple[str, str], tmp_path: Path) -> None:
    cert, key = certificate
    servicer = _Scores()
    register = lambda s: prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, s)  # noqa: E731
    service = Service("tensorflow.serving.PredictionService", register)
    with build_server(ServerConfig(metrics_port=None, tls_cert=cert, tls_key=key), [service]) as server:
        address = f"127.0.0.1:{server.port}"
        with MonolithClient(address, timeout=10, tls_ca=cert, tls_server_name="localhost") as client:
            np.testing.assert_array_equal(client.predict({"movie_id": [1, 2, 3]}), [0.25, 0.25, 0.25])
        with MonolithClient(address, timeout=5) as plaintext, pytest.raises(PredictError) as refused:
            plaintext.predict({"movie_id": [1]})
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        with MonolithClient(address, timeout=5, tls=True) as untrusted, pytest.raises(PredictError) as untrusted_error:
            untrusted.predict({"movie_id": [1]})  # the self-signed certificate is in no system root store
        assert untrusted_error.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="tls_ca: cannot read"):
        MonolithClient(address, tls_ca=str(tmp_path / "missing.crt"))
