"""Wires a dense-PS process: store + gRPC server; and its CLI."""

from __future__ import annotations

import argparse
import logging

from monolith.api.dense_ps.v1 import dense_ps_pb2_grpc as pb_grpc
from monolith.common.server import (
    MonolithServer,
    ServerConfig,
    Service,
    add_server_arguments,
    build_server,
    server_config_from_args,
)
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
    add_server_arguments(parser, port=50060, metrics_port=9095)
    parser.add_argument(
        "--restore-required", action="store_true",
        help="start NOT_SERVING, refusing Init/Pull/Push, until the checkpoint controller restores this dense-PS",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """`monolith dense-ps`: serves the dense parameters until SIGTERM."""
    store = DenseStore(load_model_config(args.config).model.optimizer, restore_required=args.restore_required)
    server = build_dense_ps(store, server_config_from_args(args))
    c = store.optimizer_config
    _LOGGER.info("dense-ps with %s (learning rate %g) on port %d%s", c.kind, c.learning_rate, server.port,
                 ", waiting to be restored" if args.restore_required else "")  # fmt: skip
    store.on_restored = lambda: server.set_serving(True)
    server.start(serving=not store.awaiting_restore)
    if not store.awaiting_restore:  # a restore may have come in while start() reported NOT_SERVING
        server.set_serving(True)
    server.run_until_signal()
    return 0
