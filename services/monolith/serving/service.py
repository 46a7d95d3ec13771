"""`monolith serving`: the Predict API process."""

from __future__ import annotations

import argparse
import logging

import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from monolith.common.config import parse_config, positive_seconds
from monolith.common.server import (
    MonolithServer,
    ServerConfig,
    Service,
    add_server_arguments,
    build_server,
    server_config_from_args,
)
from monolith.dense_ps.client import DensePSClient
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import default_config_path, load_model_config
from monolith.serving.batching import BatchingConfig, PredictBatcher
from monolith.serving.embedding_cache import add_cache_arguments, build_cache
from monolith.serving.impressions import DEFAULT_QUEUE, ImpressionLog
from monolith.serving.limits import RequestLimits
from monolith.serving.model import ServingModel, dense_refresher
from monolith.serving.servicer import SERVICE_NAME, PredictionServicer, SignatureConfig
from monolith.streams.config import add_streams_arguments, streams_config_from_args

_LOGGER = logging.getLogger("monolith.serving")


def build_serving(
    model: ServingModel,
    signature: SignatureConfig,
    server_config: ServerConfig,
    impressions: ImpressionLog | None = None,
    batcher: PredictBatcher | None = None,
) -> MonolithServer:
    """An unstarted Predict server over `model`, logging impressions to `impressions` if given.

    With `batcher`, concurrent calls are scored in batches.
    """
    servicer = PredictionServicer(model, signature, impressions, batcher)
    return build_server(
        server_config,
        [Service(SERVICE_NAME, lambda s: prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, s))],
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith serving`."""
    parser.add_argument("--config", default=default_config_path(), help="model config YAML (default: MovieLens)")
    parser.add_argument("--embedding-ps", required=True, help="comma-separated host:port of every SERVING shard")
    parser.add_argument("--dense-ps", required=True, help="host:port of the dense-PS")
    parser.add_argument("--model-name", default="monolith", help="model_spec.name clients use")
    parser.add_argument("--signature-name", default="serving_default", help="model_spec.signature_name")
    parser.add_argument("--dense-sync-interval", type=positive_seconds, default=10.0, help="seconds between dense pulls")
    parser.add_argument("--ps-timeout", type=positive_seconds, default=5.0, help="seconds per embedding-PS lookup")
    add_cache_arguments(parser)
    parser.add_argument("--max-inflight", type=int, default=64, help="calls in flight before RESOURCE_EXHAUSTED")
    parser.add_argument("--workers", type=int, default=16, help="threads serving calls")
    defaults = RequestLimits()
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help=f"examples per Predict (default {defaults.max_batch})")  # fmt: skip
    parser.add_argument("--max-elements", type=int, default=defaults.max_elements,
                        help=f"values per Predict, summed over inputs after broadcasting (default {defaults.max_elements})")  # fmt: skip
    parser.add_argument("--max-string-bytes", type=int, default=defaults.max_string_bytes,
                        help=f"bytes of string values per Predict (default {defaults.max_string_bytes})")  # fmt: skip
    batching = BatchingConfig()
    parser.add_argument("--batch-max-examples", type=int, default=batching.max_examples,
                        help="examples scored together at most when concurrent calls are batched; 0 turns "
                        f"batching off (default {batching.max_examples})")  # fmt: skip
    parser.add_argument("--batch-timeout-micros", type=int, default=batching.timeout_micros,
                        help="microseconds a batch waits, from its oldest call, for more calls "
                        f"(default {batching.timeout_micros})")  # fmt: skip
    parser.add_argument("--batch-threads", type=int, default=batching.threads,
                        help=f"threads scoring batches (default {batching.threads})")  # fmt: skip
    add_streams_arguments(parser, required=False)  # --nats set: Predict calls with a request_id log impressions
    parser.add_argument("--impression-queue", type=int, default=DEFAULT_QUEUE,
                        help="impressions queued for NATS at most; past it they are dropped and counted "
                        f"(default {DEFAULT_QUEUE})")  # fmt: skip
    add_server_arguments(parser, port=8500, metrics_port=9100, tls=True)  # 8500: TF Serving's gRPC port


def run(args: argparse.Namespace) -> int:
    """Serves Predict until SIGTERM."""
    # The tower is small (a few thousand multiply-adds per candidate): spreading one call
    # over TensorFlow's thread pools only makes concurrent calls contend for the cores.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    config = load_model_config(args.config)
    addresses = [a.strip() for a in args.embedding_ps.split(",") if a.strip()]
    sparse = ShardedEmbeddingClient(addresses, config.table_dims(), timeout=args.ps_timeout)
    dense = DensePSClient(args.dense_ps)
    limits = parse_config(
        RequestLimits,
        {"max_batch": args.max_batch, "max_elements": args.max_elements, "max_string_bytes": args.max_string_bytes},
    )
    cache = build_cache(args, sparse, config)  # None with --embedding-cache-bytes 0
    model = ServingModel(config, cache or sparse, dense, limits)
    batching = parse_config(
        BatchingConfig,
        {"max_examples": args.batch_max_examples, "timeout_micros": args.batch_timeout_micros,
         "threads": args.batch_threads},
    )  # fmt: skip
    batcher = PredictBatcher(model, batching) if batching.enabled else None
    impressions = None
    if args.nats:
        if config.item_feature is None:
            raise ValueError("--nats logs impressions, which need item_feature in the model config")
        if args.impression_queue < 1:
            raise ValueError(f"--impression-queue must be >= 1, got {args.impression_queue}")
        streams = streams_config_from_args(args)
        impressions = ImpressionLog(streams, args.impression_queue)
    server = build_serving(
        model,
        SignatureConfig(args.model_name, args.signature_name),
        server_config_from_args(args, max_workers=args.workers, max_concurrent_rpcs=args.max_inflight),
        impressions,
        batcher,
    )
    refresher = dense_refresher(model, args.dense_sync_interval, on_ready=lambda: server.set_serving(True))
    if impressions is not None:
        impressions.start()  # connects in the background: NATS need not be up yet
        _LOGGER.info("logging impressions to %s (%d partitions)", args.nats, args.partitions)
    if cache is not None:
        cache.start()  # follows the serving shards' changes in the background
    server.start(serving=False)  # SERVING once the first dense parameters arrive
    refresher.start()
    _LOGGER.info("serving model %r on port %d", args.model_name, server.port)

    def shutdown() -> None:
        if impressions is not None:
            impressions.close()  # the server has stopped: flush what its last calls logged
        refresher.stop()
        if cache is not None:
            cache.close()
        sparse.close()
        dense.close()

    server.run_until_signal(on_shutdown=shutdown)
    return 0
