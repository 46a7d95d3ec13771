"""Wires a dense-PS process: store + gRPC server; and its CLI."""

from __future__ import annotations

import argparse
import logging

from monolith.api.dense_ps.v1 import dense_ps_pb2_grpc as pb_grpc
from monolith.common.server import MonolithServer, ServerConfig, Service, build_server
from monolith.dense_ps import metrics
from monolith.dense_ps.servicer import SERVICE_NAME, DensePSServicer
from monolith.dense_ps.store import DenseStore
from monolith.model.config import default_config_path, load_model_config

_LOGGER = logging.getLogger("monolith.dense_ps")


def build_dense_ps(store: DenseStore, server_config: ServerConfig) -> MonolithServer:
    """An unstarted server for the store, its sizes and counters visible in /metrics."""
    servicer = DensePSServicer(store)
    metrics.STORES.add(store)
    return build_server(
        server_config, [Service(SERVICE_NAME, lambda s: pb_grpc.add_DensePSServicer_to_server(servicer, s))]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith dense-ps`."""
    parser.add_argument("--config", default=default_config_path(),
                        help="model config YAML (its `model.optimizer` is used; default: MovieLens)")  # fmt: skip
    parser.add_argument("--host", default="0.0.0.0", help="interface to bind (default: all)")
    parser.add_argument("--port", type=int, default=50060, help="gRPC port (0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, default=9095, help="Prometheus /metrics port (0: free one)")
    parser.add_argument("--max-message-mb", type=int, default=64, help="max gRPC message size in MiB")


def run(args: argparse.Namespace) -> int:
    """`monolith dense-ps`: serves the dense parameters until SIGTERM."""
    store = DenseStore(load_model_config(args.config).model.optimizer)
    server = build_dense_ps(
        store,
        ServerConfig(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            max_message_bytes=args.max_message_mb * 1024 * 1024,
        ),
    )
    c = store.optimizer_config
    _LOGGER.info("dense-ps with %s (learning rate %g) on port %d", c.kind, c.learning_rate, server.port)
    server.run_until_signal()
    return 0
