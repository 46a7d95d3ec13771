"""One-shot readiness probes: is a part ready right now? (The supervisor polls them.)"""

from __future__ import annotations

import dataclasses
import http.client
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monolith.common.channel import ChannelConfig, TlsConfig, open_channel


@dataclasses.dataclass(frozen=True)
class GrpcHealth:
    """Ready when the gRPC health service at `address` answers SERVING for the whole server.

    A role reports NOT_SERVING until it can do its work (model-serving, for instance,
    until it has dense parameters), so SERVING means ready, not merely listening. `tls`:
    the part serves TLS only (model-serving and the joiner under `monolith up --tls-cert`).
    """

    address: str
    tls: TlsConfig | None = None

    def ready(self, timeout: float = 1.0) -> bool:
        with open_channel(self.address, ChannelConfig(tls=self.tls)) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError:
                return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def __str__(self) -> str:
        return f"gRPC health of {self.address}"


@dataclasses.dataclass(frozen=True)
class GrpcAnswers:
    """Ready when the gRPC health service at `address` answers, SERVING or not.

    For a part that reports NOT_SERVING until another part acts on it: a training shard or
    dense-PS waiting for the checkpoint controller to restore it.
    """

    address: str

    def ready(self, timeout: float = 1.0) -> bool:
        with open_channel(self.address) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError:
                return False
        return True

    def __str__(self) -> str:
        return f"gRPC health of {self.address} (answering)"


@dataclasses.dataclass(frozen=True)
class HttpOk:
    """Ready when GET `url` answers 200 (nats-server's /healthz, a /metrics endpoint)."""

    url: str

    def ready(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=timeout) as response:
                return bool(response.status == 200)
        except (OSError, http.client.HTTPException):  # refused, reset, an HTTP error status, garbage
            return False

    def __str__(self) -> str:
        return f"GET {self.url}"


Probe = GrpcHealth | GrpcAnswers | HttpOk
