"""Wires a dense-PS process: store + gRPC server; and its CLI."""

from __future__ import annotations

import argparse
import logging
from typing import Mapping

import yaml

from monolith.api.dense_ps.v1 import dense_ps_pb2_grpc as pb_grpc
from monolith.common.server import MonolithServer, ServerConfig, Service, build_server
from monolith.dense_ps import metrics
from monolith.dense_ps.optimizers import DenseOptimizerConfig, dense_optimizer_from_dict
from monolith.dense_ps.servicer import SERVICE_NAME, DensePSServicer
from monolith.dense_ps.store import DenseStore
from monolith.embedding.config import ConfigError

_LOGGER = logging.getLogger("monolith.dense_ps")


def build_dense_ps(store: DenseStore, server_config: ServerConfig) -> MonolithServer:
    """An unstarted server for the store, its sizes and counters visible in /metrics."""
    servicer = DensePSServicer(store)
    metrics.STORES.add(store)
    return build_server(
        server_config, [Service(SERVICE_NAME, lambda s: pb_grpc.add_DensePSServicer_to_server(servicer, s))]
    )


def load_optimizer_file(path: str) -> DenseOptimizerConfig:
    """Reads `model.optimizer` of a model config YAML file; a missing section means defaults.

    Raises:
        ConfigError: the file is missing or not YAML, or the optimizer is invalid (naming
            the field).
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: must be a mapping")
    # Other keys of `model` (the dense tower's layers) belong to the trainer.
    model = raw.get("model") or {}
    if not isinstance(model, Mapping):
        raise ConfigError(f"model: must be a mapping, got {type(model).__name__}")
    return dense_optimizer_from_dict(model.get("optimizer"), "model.optimizer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith dense-ps`."""
    parser.add_argument("--config", required=True, help="model config YAML (its `model.optimizer` is used)")
    parser.add_argument("--host", default="0.0.0.0", help="interface to bind (default: all)")
    parser.add_argument("--port", type=int, default=50060, help="gRPC port (0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, default=9095, help="Prometheus /metrics port (0: free one)")
    parser.add_argument("--max-message-mb", type=int, default=64, help="max gRPC message size in MiB")


def run(args: argparse.Namespace) -> int:
    """`monolith dense-ps`: serves the dense parameters until SIGTERM."""
    store = DenseStore(load_optimizer_file(args.config))
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
