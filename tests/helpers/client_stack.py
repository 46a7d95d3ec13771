"""The servers a product backend's client talks to, in this process on free ports: a
nats-server, model-serving logging impressions, and the sample-joiner (ReportActions and the
join); both gRPC servers over TLS when given a certificate."""

from __future__ import annotations

from typing import Any

from helpers.models import small_config, trained_serving_model
from helpers.waiting import wait_for
from monolith.common.server import MonolithServer, ServerConfig
from monolith.joiner.config import JoinerConfig
from monolith.joiner.runtime import JoinerRuntime
from monolith.joiner.service import build_joiner
from monolith.serving.impressions import ImpressionLog
from monolith.serving.service import build_serving
from monolith.serving.servicer import SignatureConfig
from monolith.streams.config import StreamsConfig
from monolith.streams.nats_server import NatsServer
from monolith_client import MonolithClient

PARTITIONS = 2


class ClientStack:
    """NATS, model-serving with impressions on, and the joiner.

    Args:
        data_dir: NATS' store.
        tls: (certificate, key) PEM files: serving and the joiner serve TLS only.
    """

    def __init__(self, data_dir: str, tls: tuple[str, str] | None = None) -> None:
        self.nats = NatsServer(data_dir).start()
        self.streams = StreamsConfig(url=self.nats.url, partitions=PARTITIONS, timeout=2.0)
        self.tls = tls
        model = trained_serving_model(small_config(), examples=256)
        self.impressions = ImpressionLog(self.streams).start()
        self.serving: MonolithServer = build_serving(model, SignatureConfig(), self._server_config(), self.impressions)
        self.serving.start()
        self.joiner_runtime = JoinerRuntime(self.streams, JoinerConfig(window=100.0, lateness=0.0), range(PARTITIONS))
        self.joiner: MonolithServer = build_joiner(self.joiner_runtime, self._server_config())
        self.joiner.start(serving=False)
        self.joiner_runtime.start(on_ready=lambda: self.joiner.set_serving(True))
        wait_for(lambda: self.joiner_runtime.ready, "the joiner to connect")

    def _server_config(self) -> ServerConfig:
        cert, key = self.tls or (None, None)
        return ServerConfig(host="127.0.0.1", port=0, metrics_port=None, tls_cert=cert, tls_key=key)

    @property
    def client_tls(self) -> dict[str, Any]:
        """The client arguments that trust the stack's certificate (none without TLS)."""
        return {} if self.tls is None else {"tls_ca": self.tls[0], "tls_server_name": "localhost"}

    def client(self, **kwargs: Any) -> MonolithClient:
        return MonolithClient(self.serving.address, joiner_address=self.joiner.address, timeout=10.0,
                              **{**self.client_tls, **kwargs})  # fmt: skip

    def close(self) -> None:
        self.serving.stop(grace=0)
        self.impressions.close(timeout=2.0)
        self.joiner.stop(grace=0)
        self.joiner_runtime.stop()
        self.nats.stop()
