"""`monolith bench ablations`: the paper's findings (its section 3) on MovieLens-100k, in one run.

Every row is the model config as shipped, trained in one process with the report protocol
(batch training on the first 80% by time, progressive validation over the last 20%):
- collisionless table vs the hashing trick: each feature's ids folded into 10,000 /
  1,000 / 100 buckets per feature before training (`data/buckets.py`), so distinct ids
  share rows; `hashed_<B>_rows` counts the rows the user and movie tables ended with;
- serving-copy refresh interval: the stream is also scored by stale copies of the
  parameters refreshed every 1 / 64 / 1,024 / 16,384 trained events with the sync's
  primitive (`trainer/scoring_copy.py`), the paper's sync-interval experiment simulated in
  one process; the copies score beside the collisionless run and change nothing it learns;
- online vs frozen: that run's progressive AUC against the AUC of its parameters frozen
  after batch training.
The collisionless run is the online run: `collisionless_auc` and `online_auc` are one
figure. A PNG of the three comparisons is written to `--plot` (default ablations.png).

`bars_met` checks the shape the paper reports: collisionless > 1,000 buckets > 100
buckets, refresh every event > every 1,024 > every 16,384, online > frozen.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from monolith.data.batch import Batch
from monolith.data.buckets import hashed_into_buckets
from monolith.data.movielens import load_movielens
from monolith.model.config import ModelConfig, default_config_path, load_model_config
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.trainer.evaluation import ProtocolResult, progressive_validation
from monolith.trainer.scoring_copy import ScoringCopy
from monolith.trainer.worker import TrainerWorker

BUCKETS = (10_000, 1_000, 100)
REFRESH_INTERVALS = (1, 64, 1_024, 16_384)
PLOT_FILE = "ablations.png"

BARS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "collisionless_auc>hashed_1000_auc>hashed_100_auc":
        lambda r: r["collisionless_auc"] > r["hashed_1000_auc"] > r["hashed_100_auc"],
    "refresh_1_auc>refresh_1024_auc>refresh_16384_auc":
        lambda r: r["refresh_1_auc"] > r["refresh_1024_auc"] > r["refresh_16384_auc"],
    "online_auc>frozen_auc": lambda r: r["online_auc"] > r["frozen_auc"],
}  # fmt: skip


def _progress(message: str) -> None:
    print(f"[bench ablations] {message}", file=sys.stderr, flush=True)


def train_and_stream(config: ModelConfig, data: Batch, label: str,
                     refresh_intervals: tuple[int, ...] = ()) -> tuple[ProtocolResult, dict[str, int]]:  # fmt: skip
    """The report protocol on in-memory tables; the result and each table's rows at the end."""
    sparse, dense = LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer)
    worker = TrainerWorker(config, sparse, dense)
    copies = [ScoringCopy(config, worker.model, sparse, dense, interval) for interval in refresh_intervals]
    try:
        result = progressive_validation(worker, data, label=label, copies=copies)
    finally:
        worker.close()
    return result, {name: len(table) for name, table in sparse.tables.items()}


def _limits(bar: str, result: dict[str, Any]) -> list[str]:
    """A missed bar: the figures it compares, and what they depend on."""
    names = [name for name in bar.replace(">", " ").split() if name in result]
    lines = [", ".join(f"{name} {result[name]:.4f}" for name in names)]
    if bar.startswith("refresh"):
        lines.append(f"over {result['eval_examples']} streamed events, trained {result['online_batch_size']} per step: "
                     "an interval at least the stream's length never refreshes (it scores as frozen)")  # fmt: skip
    if bar.startswith("collisionless"):
        lines.append(f"rows (user_id, movie_id): collisionless {result['collisionless_rows']}, 1,000 buckets "
                     f"{result['hashed_1000_rows']}, 100 buckets {result['hashed_100_rows']}")  # fmt: skip
    return lines


def plot(path: str, result: dict[str, Any]) -> str:
    """Three bar groups (hashing, refresh interval, online vs frozen) of progressive AUC; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    groups = [
        ("embedding table", ["collisionless"] + [f"{b:,} buckets" for b in BUCKETS],
         [result["collisionless_auc"]] + [result[f"hashed_{b}_auc"] for b in BUCKETS]),
        ("serving copy refreshed every", [f"{n:,} ev." for n in REFRESH_INTERVALS],
         [result[f"refresh_{n}_auc"] for n in REFRESH_INTERVALS]),
        ("training", ["online", "frozen"], [result["online_auc"], result["frozen_auc"]]),
    ]  # fmt: skip
    values = [v for _, _, vs in groups for v in vs]
    low = min(values) - 0.02
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.2), dpi=110, sharey=True,
                                gridspec_kw={"width_ratios": [4, 4, 2]})  # fmt: skip
    try:
        for ax, (title, names, auc_values) in zip(axes, groups):
            bars = ax.bar(names, [v - low for v in auc_values], bottom=low, color="#4878a8")
            for bar, value in zip(bars, auc_values):
                ax.annotate(f"{value:.4f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")  # fmt: skip
            ax.set_title(title)
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].set_ylabel("progressive AUC over the last 20% of events")
        axes[0].set_ylim(low, max(values) + 0.01)
        figure.suptitle("Monolith's findings on MovieLens-100k (one run)")
        figure.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    config_path = getattr(args, "config", None) or default_config_path()
    config = load_model_config(config_path)
    data = load_movielens(limit=20_000 if getattr(args, "quick", False) else None)
    _progress(f"{len(data)} examples; config {config_path}")
    result: dict[str, Any] = {}

    _progress(f"collisionless, online, scored also by copies refreshed every {REFRESH_INTERVALS} events")
    online, rows = train_and_stream(config, data, "collisionless", REFRESH_INTERVALS)
    result["collisionless_auc"] = result["online_auc"] = online.progressive_auc
    result["frozen_auc"] = online.frozen_auc
    for interval, value in online.refresh_auc.items():
        result[f"refresh_{interval}_auc"] = value
    result["collisionless_rows"] = {"user_id": rows["user_id"], "movie_id": rows["movie_id"]}
    for buckets in BUCKETS:
        _progress(f"hashing trick: {buckets:,} buckets per feature")
        hashed, rows = train_and_stream(config, hashed_into_buckets(data, buckets), f"hashed {buckets}")
        result[f"hashed_{buckets}_auc"] = hashed.progressive_auc
        result[f"hashed_{buckets}_rows"] = {"user_id": rows["user_id"], "movie_id": rows["movie_id"]}
    result = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    result["train_examples"], result["eval_examples"] = online.train_examples, online.eval_examples
    result["online_batch_size"] = config.training.online_batch_size
    result["bars_met"] = {bar: check(result) for bar, check in BARS.items()}
    result["limits"] = {bar: _limits(bar, result) for bar, met in result["bars_met"].items() if not met}
    result["plot"] = plot(getattr(args, "plot", None) or PLOT_FILE, result)
    return result
