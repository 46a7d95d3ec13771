"""`monolith bench train`: learning on MovieLens-100k, distributed vs in one process.

The protocol (trainer/evaluation.py): one pass over the first 80% by time, the AUC of
that frozen model on the last 20%, then progressive validation over the last 20%
(score each online batch, then train on it). Run twice in one process, on one machine:
- distributed: 2 embedding-PS shard processes + 1 dense-PS process on loopback, the
  trainer here talking gRPC to them;
- reference: the same model and config with in-memory tables and dense store, no gRPC.
Plus the running-mean baseline of SYSTEM.md on the same events.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from monolith.bench.cluster import start_parameter_servers
from monolith.common.process import RoleProcess
from monolith.data.movielens import load_movielens
from monolith.dense_ps.client import DensePSClient
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import default_config_path, load_model_config
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.trainer.evaluation import ProtocolResult, progressive_validation, running_mean_baseline
from monolith.trainer.worker import TrainerWorker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=default_config_path(), help="model config (default: MovieLens)")


def _progress(message: str) -> None:
    print(f"[bench train] {message}", file=sys.stderr, flush=True)


def _distributed(config_path: str, data, workdir: str) -> ProtocolResult:  # type: ignore[no-untyped-def]
    config = load_model_config(config_path)
    procs: list[RoleProcess] = []
    try:
        ps, dense_address = start_parameter_servers(config_path, workdir, procs, "train")
        with ShardedEmbeddingClient(ps, config.table_dims()) as sparse, DensePSClient(dense_address) as dense:
            worker = TrainerWorker(config, sparse, dense)
            return progressive_validation(worker, data, label="distributed")
    finally:
        for proc in procs:
            proc.stop()


def run(args: argparse.Namespace) -> dict:
    config_path = getattr(args, "config", None) or default_config_path()
    config = load_model_config(config_path)
    limit = 20_000 if getattr(args, "quick", False) else None
    data = load_movielens(limit=limit)
    _progress(f"{len(data)} examples; config {config_path}")

    _progress("reference: one process, in-memory tables")
    reference = progressive_validation(
        TrainerWorker(config, LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer)),
        data,
        label="reference",
    )
    _progress("distributed: 2 embedding-PS shards + dense-PS on loopback")
    with tempfile.TemporaryDirectory(prefix="monolith-bench-train-") as workdir:
        distributed = _distributed(config_path, data, workdir)
    baseline = running_mean_baseline(data)
    result = {
        "progressive_auc": distributed.progressive_auc,
        "frozen_auc": distributed.frozen_auc,
        "running_mean_baseline_auc": baseline,
        "reference_progressive_auc": reference.progressive_auc,
        "reference_frozen_auc": reference.frozen_auc,
        "examples_per_s": distributed.examples_per_s,
        "reference_examples_per_s": reference.examples_per_s,
        "speed_vs_reference": distributed.examples_per_s / reference.examples_per_s,
        "train_examples": distributed.train_examples,
        "eval_examples": distributed.eval_examples,
        "batch_size": config.training.batch_size,
        "online_batch_size": config.training.online_batch_size,
        "embedding_shards": 2,
    }
    result["bars_met"] = {
        "progressive>=running_mean_baseline": result["progressive_auc"] >= baseline,
        "progressive>=reference-0.005": result["progressive_auc"] >= reference.progressive_auc - 0.005,
        "examples_per_s>=0.3*reference": result["speed_vs_reference"] >= 0.3,
    }
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
