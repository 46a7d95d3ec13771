"""`monolith trainer`: trains against the embedding-PS shards and the dense-PS.

Batch mode reads a stored data set (MovieLens-100k) once, in time order; several trainer
processes split it by batch (worker i takes batches i, i+n, i+2n, ...) and train
asynchronously against the same parameter servers. Online mode (tailing the sample log)
arrives with the sample-joiner.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading

import grpc

from monolith.common.errors import from_rpc_error
from monolith.data.batch import Batch
from monolith.data.movielens import load_movielens, split_by_time
from monolith.dense_ps.client import DensePSClient
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import default_config_path, load_model_config
from monolith.model.scores import sigmoid
from monolith.trainer.progress import Progress
from monolith.trainer.worker import TrainerWorker

_LOGGER = logging.getLogger("monolith.trainer")
PARTS = ("train", "stream", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `monolith trainer`."""
    parser.add_argument("--config", default=default_config_path(), help="model config YAML (default: MovieLens)")
    parser.add_argument("--embedding-ps", required=True, help="comma-separated host:port of every shard, in order")
    parser.add_argument("--dense-ps", required=True, help="host:port of the dense-PS")
    parser.add_argument("--mode", choices=("batch", "online"), default="batch", help="batch: a stored data set")
    parser.add_argument("--part", choices=PARTS, default="train",
                        help="which part of the data set: the first 80%% by time, the last 20%%, or all")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the data (the paper trains one)")
    parser.add_argument("--worker-index", type=int, default=0, help="this trainer's index")
    parser.add_argument("--num-workers", type=int, default=1, help="trainers sharing the data set")
    parser.add_argument("--cache-dir", default=None, help="where the data set is cached")


def run(args: argparse.Namespace) -> int:
    """Trains `--epochs` passes (one by default); prints a JSON summary of the last pass as the last line."""
    if args.mode == "online":
        print("monolith trainer: online mode (tailing the sample log) is not built yet", file=sys.stderr)
        return 2
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
    with ShardedEmbeddingClient(addresses, config.table_dims()) as sparse, DensePSClient(args.dense_ps) as dense:
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


def train_pass(worker: TrainerWorker, data: Batch, index: int, count: int, stop: threading.Event) -> dict:
    """One pass over this worker's share of the batches, until done or `stop` is set."""
    batches = [b for i, b in enumerate(data.batches(worker.config.training.batch_size)) if i % count == index]
    progress = Progress(f"trainer {index}/{count}", sum(len(b) for b in batches))
    loss = math.nan
    for batch in batches:
        if stop.is_set():
            _LOGGER.info("stopping after %d examples", progress.examples)
            break
        result = worker.train(batch)
        loss = result.loss
        progress.update(len(batch), result.loss, batch.labels, sigmoid(result.logits))
    progress.close()
    return {
        "examples": progress.examples,
        "steps": worker.steps,
        "examples_per_s": round(progress.examples_per_s, 1),
        "last_loss": loss,
        "running_auc": progress.running_auc(),
        "dense_version": worker.dense_version,
    }

