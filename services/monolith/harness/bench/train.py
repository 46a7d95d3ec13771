"""`monolith bench train`: learning on MovieLens-100k, distributed vs in one process.

Learning. The protocol (trainer/evaluation.py): one pass over the first 80% by time, the
AUC of that frozen model on the last 20%, then progressive validation over the last 20%
(score each online batch, then train on it). Run twice in one process, on one machine:
- distributed: 2 embedding-PS shard processes + 1 dense-PS process on loopback, the
  trainer here talking gRPC to them;
- reference: the same model and config with in-memory tables and dense store, no gRPC,
  looking ids up through the same dedupe kernels as the sharded client.
Plus the running-mean baseline of SYSTEM.md on the same events.

Honest tuning. The model's `validation_progressive_auc` is the same protocol on the first
80% alone (batch training on 0-60%, progressive validation over 60-80%), in one process:
the figure hyper-parameters are chosen on (`monolith bench sweep` reads only it).

Peers, side by side on the identical examples in the same order (bench/peers.py): online
logistic regression on per-id bias terms (per-example Adagrad) and Vowpal Wabbit (linear,
`-q ui`, `--lrq ui8`, each at learning rates 0.1/0.3/0.5), each grid point chosen on the
validation stream and only then scored on the last 20%. `peer_best_auc` is the best of
them and the running-mean baseline.

Speed. After the protocol both trainers are warm (TensorFlow functions traced, numba
kernels compiled, connections open). They then train on the same batches for a fixed
time each, alternating in ROUNDS rounds, with the servers' garbage-collector settings;
`examples_per_s` and `reference_examples_per_s` are the medians over rounds.

`bars_met` holds the bars this benchmark measures: history trained in batches of at least
256, distributed speed >= 0.5x in-process at that batch size, progressive AUC >= the best
peer's + 0.005, and above the running-mean
baseline and the model frozen after batch training (here as the trainer scores, not
through the live stack). For a missed speed bar, `limits` holds a sampling profile of the
distributed trainer's main thread; for a missed learning bar, the figures that bear on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

from monolith.harness.bench.cluster import start_parameter_servers
from monolith.harness.bench.measure import interleaved, median
from monolith.harness.bench.peers import run_bias_lr, run_vw
from monolith.harness.bench.sampling import Sampler
from monolith.common.process import RoleProcess
from monolith.common.server import tune_gc
from monolith.data.batch import Batch
from monolith.data.movielens import load_movielens
from monolith.dense_ps.client import DensePSClient
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import default_config_path, load_model_config
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.trainer.evaluation import progressive_validation, running_mean_baseline, validation_protocol
from monolith.trainer.worker import TrainerWorker

PEER_MARGIN = 0.005  # the brief's bar: at least this much above the best peer
SPEED_BAR = 0.5  # distributed examples/s at least this share of in-process at the same batch size
MIN_BATCH = 256  # history trained in batches at least this large

BARS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "batch_size>=256": lambda r: r["batch_size"] >= MIN_BATCH,
    "examples_per_s>=0.5*reference": lambda r: r["speed_vs_reference"] >= SPEED_BAR,
    "progressive_auc>=peer_best_auc+0.005": lambda r: r["progressive_auc"] >= r["peer_best_auc"] + PEER_MARGIN,
    "progressive_auc>running_mean_baseline": lambda r: r["progressive_auc"] > r["running_mean_baseline_auc"],
    "progressive_auc>frozen_auc": lambda r: r["progressive_auc"] > r["frozen_auc"],
}


def _progress(message: str) -> None:
    print(f"[bench train] {message}", file=sys.stderr, flush=True)


def _examples_per_s(worker: TrainerWorker, batches: list[Batch], seconds: float) -> float:
    """Trains on `batches` in turn for `seconds`, as a history pass does; examples per second."""
    start = time.perf_counter()

    def until_done() -> Iterator[Batch]:
        i = 0
        while time.perf_counter() - start < seconds:
            yield batches[i % len(batches)]
            i += 1

    done = sum(len(batch) for batch, _ in worker.train_stream(until_done()))
    return done / (time.perf_counter() - start)


def _profile(worker: TrainerWorker, batches: list[Batch], seconds: float) -> list[str]:
    """Where the distributed trainer's step spends its time, waits on the servers included."""
    threads = {threading.get_ident()}
    with Sampler(threads=threads, include_idle=True) as sampler:
        _examples_per_s(worker, batches, seconds)
    return ["trainer main thread (waits on RPCs show as wait/result frames):", *sampler.summary()]


def _learning_limits(result: dict[str, Any]) -> list[str]:
    """A missed learning bar: the figures that tell whether distribution or the model limits it."""
    same = abs(result["progressive_auc"] - result["reference_progressive_auc"]) <= 0.005
    return [
        f"progressive AUC {result['progressive_auc']:.4f}, frozen {result['frozen_auc']:.4f}, running-mean baseline "
        f"{result['running_mean_baseline_auc']:.4f}, over {result['eval_examples']} held-out events after "
        f"{result['train_examples']} training examples",
        f"the in-process reference reaches {result['reference_progressive_auc']:.4f}: "
        + ("the model and its hyper-parameters limit it, not distribution" if same else "distribution changes it"),
    ]


def _peer_limits(result: dict[str, Any]) -> list[str]:
    """A missed peer bar: every learner's validation and reported figures, side by side."""
    return [
        f"model: validation {result['validation_progressive_auc']:.4f}, reported {result['progressive_auc']:.4f} "
        f"(in-process {result['reference_progressive_auc']:.4f})",
        f"bias-only LR ({result['bias_lr_config']}): validation {result['bias_lr_validation_auc']:.4f}, "
        f"reported {result['bias_lr_auc']:.4f}",
        f"Vowpal Wabbit ({result['vw_config']}): validation {result['vw_validation_auc']:.4f}, "
        f"reported {result['vw_auc']:.4f}",
        f"running-mean baseline {result['running_mean_baseline_auc']:.4f}; the bar is "
        f"{result['peer_best_auc'] + PEER_MARGIN:.4f}",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    config_path = getattr(args, "config", None) or default_config_path()
    config = load_model_config(config_path)
    quick = getattr(args, "quick", False)
    data = load_movielens(limit=20_000 if quick else None)
    seconds = 1.0 if quick else 4.0
    _progress(f"{len(data)} examples; config {config_path}")

    _progress("validation: the first 80% only (batch 0-60%, progressive 60-80%), one process")
    validation_worker = TrainerWorker(config, LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer))
    validation = validation_protocol(validation_worker, data)
    validation_worker.close()
    _progress("peers: bias-only LR and Vowpal Wabbit grids, chosen on validation")
    bias_lr, vw = run_bias_lr(data), run_vw(data)

    _progress("reference: one process, in-memory tables")
    reference_worker = TrainerWorker(config, LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer))
    reference = progressive_validation(reference_worker, data, label="reference")
    limits: dict[str, list[str]] = {}
    _progress("distributed: 2 embedding-PS shards + dense-PS on loopback")
    procs: list[RoleProcess] = []
    with tempfile.TemporaryDirectory(prefix="monolith-bench-train-") as workdir:
        try:
            ps, dense_address = start_parameter_servers(config_path, workdir, procs, "train")
            with ShardedEmbeddingClient(ps, config.table_dims(), occurrence_tables=config.occurrence_tables()) as sparse, DensePSClient(dense_address) as dense:
                worker = TrainerWorker(config, sparse, dense)
                distributed = progressive_validation(worker, data, label="distributed")

                batches = list(data.batches(config.training.batch_size))[:50]
                tune_gc()  # the servers' settings, for both trainers in this process
                _progress(f"speed: {seconds:g} s of training per side per round, interleaved")
                speed = interleaved({
                    "reference": lambda: _examples_per_s(reference_worker, batches, seconds),
                    "distributed": lambda: _examples_per_s(worker, batches, seconds),
                })  # fmt: skip
                examples_per_s = median(speed["distributed"])
                reference_examples_per_s = median(speed["reference"])
                if examples_per_s < SPEED_BAR * reference_examples_per_s:
                    limits["examples_per_s>=0.5*reference"] = _profile(worker, batches, seconds)
                worker.close()
        finally:
            for proc in procs:
                proc.stop()
    reference_worker.close()
    baseline = running_mean_baseline(data)
    result: dict[str, Any] = {
        "progressive_auc": distributed.progressive_auc,
        "validation_progressive_auc": validation.progressive_auc,
        "frozen_auc": distributed.frozen_auc,
        "running_mean_baseline_auc": baseline,
        "bias_lr_auc": bias_lr.progressive_auc,
        "bias_lr_validation_auc": bias_lr.validation_auc,
        "bias_lr_config": bias_lr.config,
        "vw_auc": vw.progressive_auc,
        "vw_validation_auc": vw.validation_auc,
        "vw_config": vw.config,
        "vw_grid_validation_auc": {name: round(value, 4) for name, value in vw.grid.items()},
        "peer_best_auc": max(bias_lr.progressive_auc, vw.progressive_auc, baseline),
        "reference_progressive_auc": reference.progressive_auc,
        "reference_frozen_auc": reference.frozen_auc,
        "examples_per_s": examples_per_s,
        "reference_examples_per_s": reference_examples_per_s,
        "speed_vs_reference": examples_per_s / reference_examples_per_s,
        "train_examples": distributed.train_examples,
        "eval_examples": distributed.eval_examples,
        "batch_size": config.training.batch_size,
        "online_batch_size": config.training.online_batch_size,
        "embedding_shards": 2,
    }
    result["bars_met"] = {bar: check(result) for bar, check in BARS.items()}
    for bar in ("progressive_auc>running_mean_baseline", "progressive_auc>frozen_auc"):
        if not result["bars_met"][bar]:
            limits[bar] = _learning_limits(result)
    if not result["bars_met"]["progressive_auc>=peer_best_auc+0.005"]:
        limits["progressive_auc>=peer_best_auc+0.005"] = _peer_limits(result)
    result["limits"] = limits
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
