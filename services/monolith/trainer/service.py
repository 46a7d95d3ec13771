"""`monolith trainer`: trains against the embedding-PS shards and the dense-PS.

Batch mode reads a stored data set (MovieLens-100k) once, in time order; several trainer
processes split it by batch (worker i takes batches i, i+n, i+2n, ...) and train
asynchronously against the same parameter servers. Online mode trains continuously from
the sample-joiner's SAMPLES stream through a durable consumer every online trainer shares
(see `trainer.online`), with /metrics on `--metrics-port`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import signal
import threading

import grpc

from monolith.common import metrics as metrics_http
from monolith.common.channel import ChannelConfig
from monolith.common.config import parse_config
from monolith.common.errors import from_rpc_error
from monolith.common.server import ServerConfig, ServerStartError
from monolith.data.movielens import load_movielens, split_by_time
from monolith.data.samples import SampleDecoder, SampleFeature
from monolith.dense_ps.client import DensePSClient
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import ModelConfig, default_config_path, load_model_config
from monolith.streams.config import SAMPLES_STREAM, add_streams_arguments, streams_config_from_args
from monolith.streams.pull_consumer import ConsumerSettings, DurableConsumer
from monolith.trainer.control import build_control_server
from monolith.trainer.online import DEFAULT_MAX_BATCH, OnlineSettings, OnlineTrainer
from monolith.trainer.pause import StepGate
from monolith.trainer.batch import train_pass
from monolith.trainer.worker import TrainerWorker

_LOGGER = logging.getLogger("monolith.trainer")
PARTS = ("train", "stream", "all")
ONLINE_METRICS_PORT = 9108
# Back on a restarted parameter server within a second: gRPC's default reconnect backoff
# grows to 120 s, during which every retry would fail fast although the server is up.
_ONLINE_CHANNEL = ChannelConfig(fast_reconnect=True)
_CONSUMER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith trainer`."""
    parser.add_argument("--config", default=default_config_path(), help="model config YAML (default: MovieLens)")
    parser.add_argument("--embedding-ps", required=True, help="comma-separated host:port of every shard, in order")
    parser.add_argument("--dense-ps", required=True, help="host:port of the dense-PS")
    parser.add_argument("--mode", choices=("batch", "online"), default="batch",
                        help="batch: a stored data set; online: the SAMPLES stream, until stopped")  # fmt: skip
    parser.add_argument("--part", choices=PARTS, default="train",
                        help="which part of the data set: the first 80%% by time, the last 20%%, or all")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the data (the paper trains one)")
    parser.add_argument("--worker-index", type=int, default=0, help="this trainer's index")
    parser.add_argument("--num-workers", type=int, default=1, help="trainers sharing the data set")
    parser.add_argument("--cache-dir", default=None, help="where the data set is cached")
    online = parser.add_argument_group("online mode")
    add_streams_arguments(online, required=False)
    online.add_argument("--consumer", default="trainer",
                        help="durable consumer name; online trainers with the same name share the samples")  # fmt: skip
    online.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="samples per step at most: a step takes every sample delivered, up to this (default "
                        f"{DEFAULT_MAX_BATCH}); a trickle trains sample by sample, a backlog in large steps")  # fmt: skip
    online.add_argument("--host", default="0.0.0.0", help="interface /metrics binds (default: all)")
    online.add_argument("--control-port", type=int, default=None,
                        help="serve TrainerControl (pause/resume for the checkpoint controller) on this port; "
                        "0 picks a free one; default: none")  # fmt: skip
    online.add_argument("--start-paused", action="store_true",
                        help="wait for the checkpoint controller's Resume before the first step (needs --control-port)")  # fmt: skip
    online.add_argument("--metrics-port", type=int, default=ONLINE_METRICS_PORT,
                        help=f"Prometheus /metrics port (default {ONLINE_METRICS_PORT}; 0 picks a free one)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Trains `--epochs` passes (one by default); prints a JSON summary of the last pass as the last line."""
    if args.mode == "online":
        return run_online(args)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {args.num_workers}")
    if not 0 <= args.worker_index < args.num_workers:
        raise ValueError(f"--worker-index must be in 0..{args.num_workers - 1}, got {args.worker_index}")
    config = load_model_config(args.config)
    data = load_movielens(args.cache_dir, limit=args.limit)
    train, stream = split_by_time(data)
    data = {"train": train, "stream": stream, "all": data}[args.part]
    addresses = [a.strip() for a in args.embedding_ps.split(",") if a.strip()]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ShardedEmbeddingClient(addresses, config.table_dims(), occurrence_tables=config.occurrence_tables()) as sparse, DensePSClient(args.dense_ps) as dense:
        try:
            worker = TrainerWorker(config, sparse, dense)
            for _ in range(args.epochs):
                summary = train_pass(worker, data, args.worker_index, args.num_workers, stop)
                if stop.is_set():
                    break
            worker.close()
        except grpc.RpcError as exc:
            # The sharded client names its shard in its own errors; a raw gRPC error is the dense-PS's.
            raise from_rpc_error(exc, f"dense-PS at {args.dense_ps}") from None
    print(json.dumps(summary, sort_keys=True))
    return 0


def run_online(args: argparse.Namespace) -> int:
    """Trains from the SAMPLES stream until SIGTERM (or Ctrl-C); prints a JSON summary last."""
    if not args.nats:
        raise ValueError("--nats is required with --mode online")
    if args.start_paused and args.control_port is None:
        raise ValueError("--start-paused needs --control-port (only the controller can resume the trainer)")
    if not _CONSUMER_NAME.fullmatch(args.consumer):
        raise ValueError(f"--consumer must be 1-64 letters, digits, '-' or '_', got {args.consumer!r}")
    streams = streams_config_from_args(args)
    config = load_model_config(args.config)
    settings = parse_config(OnlineSettings, {"max_batch": args.max_batch})
    addresses = [a.strip() for a in args.embedding_ps.split(",") if a.strip()]

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        httpd, port = metrics_http.start_metrics_http(args.host, args.metrics_port)
    except OSError as exc:
        raise ServerStartError(f"cannot serve /metrics on {args.host}:{args.metrics_port}: {exc}") from None
    _LOGGER.info("online trainer %r: /metrics at http://%s:%d/metrics", args.consumer, args.host, port)
    consumer = DurableConsumer(streams, ConsumerSettings(SAMPLES_STREAM, "samples.>", args.consumer),
                               client_name=f"trainer/{args.consumer}")  # fmt: skip
    try:
        with ShardedEmbeddingClient(addresses, config.table_dims(), timeout=10, channel=_ONLINE_CHANNEL,
                                    occurrence_tables=config.occurrence_tables()) as sparse, \
                DensePSClient(args.dense_ps, timeout=10, channel=_ONLINE_CHANNEL) as dense:  # fmt: skip
            trainer = OnlineTrainer(consumer, lambda: TrainerWorker(config, sparse, dense), sample_decoder(config),
                                    settings, stop, StepGate(start_paused=args.start_paused))  # fmt: skip
            control = None
            if args.control_port is not None:
                control, _ = build_control_server(
                    trainer, ServerConfig(host=args.host, port=args.control_port, metrics_port=None, grace_seconds=1.0)
                )
                control.start()
                _LOGGER.info("TrainerControl on %s:%d%s", args.host, control.port,
                             " (paused until the controller resumes)" if args.start_paused else "")  # fmt: skip
            try:
                summary = trainer.run()
            finally:
                if control is not None:
                    control.stop(grace=0)
    finally:
        consumer.close()
        metrics_http.stop_metrics_http(httpd)
    print(json.dumps(dataclasses.asdict(summary), sort_keys=True))
    return 0


def sample_decoder(config: ModelConfig) -> SampleDecoder:
    """Decodes samples into the model's features, hashed as model-serving hashes them."""
    return SampleDecoder([SampleFeature(f.source, f.multi_valued) for f in config.features])
