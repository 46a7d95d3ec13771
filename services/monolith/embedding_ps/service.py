"""Wires an embedding-PS process: shard + gRPC server + expiry sweeps or sync; and its CLI."""

from __future__ import annotations

import argparse
import logging

from monolith.common.config import parse_config, positive_seconds, seconds
from monolith.common.periodic import PeriodicTask
from monolith.common.server import (
    MonolithServer,
    ServerConfig,
    Service,
    add_server_arguments,
    build_server,
    server_config_from_args,
)
from monolith.embedding_ps import metrics
from monolith.model.config import load_model_config
from monolith.embedding_ps.servicer import SERVICE_NAME, EmbeddingPSServicer
from monolith.embedding_ps.shard import ROLES, EmbeddingShard, ShardConfig
from monolith.embedding_ps.sync import DEFAULT_MAX_RESYNC_DELETE_FRACTION, ServingSync
from monolith.api.embedding_ps.v1 import embedding_ps_pb2_grpc as pb_grpc

_LOGGER = logging.getLogger("monolith.embedding_ps")


def build_embedding_ps(shard: EmbeddingShard, server_config: ServerConfig) -> MonolithServer:
    """An unstarted server for one shard, its tables visible in /metrics.

    Raises:
        ValueError: the shard may answer with messages larger than the server can send.
    """
    if shard.config.max_message_bytes > server_config.max_message_bytes:
        raise ValueError(
            f"shard max_message_bytes={shard.config.max_message_bytes} exceeds the server's "
            f"max_message_bytes={server_config.max_message_bytes}; set both to the same limit"
        )
    servicer = EmbeddingPSServicer(shard)
    metrics.SHARDS.add(shard)
    return build_server(
        server_config, [Service(SERVICE_NAME, lambda s: pb_grpc.add_EmbeddingPSServicer_to_server(servicer, s))]
    )


def expiry_sweeper(shard: EmbeddingShard, interval: float) -> PeriodicTask:
    """Runs the shard's expiry sweep every `interval` seconds (not started)."""

    def sweep() -> None:
        evicted = shard.expire()
        if any(evicted.values()):
            _LOGGER.info("expiry sweep evicted %s", {k: v for k, v in evicted.items() if v})

    return PeriodicTask("expiry-sweeper", interval, sweep, run_first=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith embedding-ps`."""
    parser.add_argument("--shard", type=int, required=True, help="this shard's index, 0..num-shards-1")
    parser.add_argument("--num-shards", type=int, required=True, help="number of shards")
    parser.add_argument("--config", required=True, help="model config YAML (this shard holds every feature's table and bias table)")
    parser.add_argument("--role", choices=ROLES, default="training", help="training or serving (read-only)")
    add_server_arguments(parser, port=50051, metrics_port=9090)
    parser.add_argument(
        "--expire-interval", type=seconds, default=60.0,
        help="seconds between expiry sweeps; 0 turns them off (none with --sync-from: expirations arrive from the training shard)",
    )  # fmt: skip
    parser.add_argument("--max-ids-per-request", type=int, default=1_000_000, help="ids one request may carry")
    parser.add_argument(
        "--sync-from",
        metavar="HOST:PORT",
        help="training shard (same index) this serving shard follows: pulls its changes every --sync-interval",
    )
    parser.add_argument(
        "--sync-interval", type=positive_seconds, default=1.0, help="seconds between syncs from --sync-from (default 1)"
    )
    parser.add_argument(
        "--restore-required", action="store_true",
        help="(training) start NOT_SERVING, refusing lookups, writes and exports, until the checkpoint controller "
        "restores this shard",
    )  # fmt: skip
    parser.add_argument(
        "--max-resync-delete-fraction", type=float, default=DEFAULT_MAX_RESYNC_DELETE_FRACTION,
        help="(serving) a full copy of a new training incarnation that lacks more than this fraction of the "
        "serving shard's rows is logged as an error and counted (a training shard restarted without a restore?); "
        "the rows stay served either way (default 0.1)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """`monolith embedding-ps`: serves one shard until SIGTERM."""
    if args.sync_from and args.role != "serving":
        raise ValueError(f"--sync-from needs --role serving (a {args.role} shard takes no imports from another)")
    if args.restore_required and args.role != "training":
        raise ValueError("--restore-required needs --role training (serving shards follow theirs by sync)")
    shard = EmbeddingShard(
        parse_config(
            ShardConfig,
            {
                "shard": args.shard,
                "num_shards": args.num_shards,
                "role": args.role,
                "tables": load_model_config(args.config).tables(),
                "max_ids_per_request": args.max_ids_per_request,
                "max_message_bytes": args.max_message_mb * 1024 * 1024,
                "restore_required": args.restore_required,
            },
        )
    )
    # A synced serving shard mirrors its training shard, expirations included; sweeping
    # it on its own would only make it diverge.
    follower = None
    if args.sync_from:
        follower = ServingSync(shard, args.sync_from, args.sync_interval,
                               max_resync_delete_fraction=args.max_resync_delete_fraction)  # fmt: skip
    server = build_embedding_ps(shard, server_config_from_args(args))
    sweeper = None if follower or args.expire_interval <= 0 else expiry_sweeper(shard, args.expire_interval)
    if sweeper:
        sweeper.start()
    _LOGGER.info(
        "embedding-ps shard %d/%d (%s) with tables %s on port %d%s",
        args.shard, args.num_shards, args.role, ", ".join(shard.tables), server.port,
        f", following {args.sync_from} every {args.sync_interval:g} s" if follower else "",
    )  # fmt: skip
    if shard.awaiting_restore:
        _LOGGER.info("waiting to be restored from a checkpoint (NOT_SERVING until then)")
    shard.on_restored = lambda: server.set_serving(True)
    server.start(serving=not shard.awaiting_restore)
    if not shard.awaiting_restore:  # a restore may have come in while start() reported NOT_SERVING
        server.set_serving(True)
    if follower:
        # Serve at once (unknown ids read as zeros) rather than wait for the first copy.
        follower.start()

    def shut_down() -> None:
        if sweeper:
            sweeper.stop()
        if follower:
            follower.stop()

    server.run_until_signal(on_shutdown=shut_down)
    return 0
