"""The evaluation protocol of SYSTEM.md, and the running-mean baseline.

Progressive validation (the paper's protocol for real-time training): events in time
order; train one pass on the first 80%; then stream the last 20%, scoring each batch with
the current parameters *before* training on it; AUC over the scored events. The AUC of the
model frozen after the first 80% is measured on the same events, before the stream.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from monolith.data.batch import Batch
from monolith.trainer.metrics import auc, log_loss
from monolith.trainer.progress import Progress
from monolith.trainer.worker import TrainerWorker


@dataclasses.dataclass(frozen=True)
class ProtocolResult:
    """AUCs and training speed of one protocol run."""

    frozen_auc: float
    progressive_auc: float
    train_examples: int
    eval_examples: int
    examples_per_s: float  # during the one-pass training on the first part
    final_train_loss: float


def progressive_validation(
    worker: TrainerWorker, data: Batch, fraction: float = 0.8, label: str = "train", show_progress: bool = True
) -> ProtocolResult:
    """Runs the protocol with one worker.

    Args:
        worker: the trainer (its backends decide in-process or distributed).
        data: time-ordered examples.
        fraction: the part trained in batch mode.
        label: prefix of the progress lines.
        show_progress: print progress lines on stderr.
    """
    cut = round(len(data) * fraction)
    train, stream = data.slice(0, cut), data.slice(cut, len(data))
    batch_size = worker.config.training.batch_size

    progress = Progress(f"{label}: batch training", len(train), enabled=show_progress)
    start = time.perf_counter()
    loss = math.nan
    for batch in train.batches(batch_size):
        result = worker.train(batch)
        loss = result.loss
        progress.update(len(batch), result.loss, batch.labels, result.logits)
    elapsed = time.perf_counter() - start
    progress.close()

    frozen = np.concatenate([worker.predict(b) for b in stream.batches(batch_size)])
    frozen_auc = auc(stream.labels, frozen)

    progress = Progress(f"{label}: progressive", len(stream), enabled=show_progress)
    scores = []
    for batch in stream.batches(worker.config.training.online_batch_size):
        scored = worker.predict(batch)
        scores.append(scored)
        result = worker.train(batch)
        progress.update(len(batch), result.loss, batch.labels, scored)
    progress.close()
    return ProtocolResult(
        frozen_auc=frozen_auc,
        progressive_auc=auc(stream.labels, np.concatenate(scores)),
        train_examples=len(train),
        eval_examples=len(stream),
        examples_per_s=len(train) / elapsed,
        final_train_loss=loss,
    )


def evaluate(worker: TrainerWorker, data: Batch) -> dict[str, float]:
    """Log loss and AUC of the current parameters on `data`; changes nothing."""
    scores = np.concatenate([worker.predict(b) for b in data.batches(worker.config.training.batch_size)])
    return {"log_loss": log_loss(data.labels, scores), "auc": auc(data.labels, scores)}


def running_mean_baseline(data: Batch, fraction: float = 0.8, prior_weight: float = 2.0) -> float:
    """AUC over the last part of online running means of user and item positive rates.

    See `running_mean_scores`; the means run over all of `data`, the AUC is over the part
    after `fraction`.
    """
    cut = round(len(data) * fraction)
    return auc(data.labels[cut:], running_mean_scores(data, prior_weight)[cut:])


def running_mean_scores(data: Batch, prior_weight: float = 2.0) -> np.ndarray:
    """Progressive scores of the running-mean baseline, one per event of `data` (in order).

    Each event is scored before it updates the means: the score is the sum of the logits
    of the user's and the item's smoothed positive rates, each (positives + w * p) /
    (events + w) with p the running global rate, so unseen users and items start at p.
    """
    users = np.unique(data.ids["user_id"], return_inverse=True)[1]
    items = np.unique(data.ids["movie_id"], return_inverse=True)[1]
    labels = data.labels.astype(np.float64)
    user_pos, user_n = np.zeros(users.max() + 1), np.zeros(users.max() + 1)
    item_pos, item_n = np.zeros(items.max() + 1), np.zeros(items.max() + 1)
    scores = np.empty(len(labels))
    positives = 0.0
    for i in range(len(labels)):
        p = (positives + 1.0) / (i + 2.0)
        u, m = users[i], items[i]
        ru = (user_pos[u] + prior_weight * p) / (user_n[u] + prior_weight)
        rm = (item_pos[m] + prior_weight * p) / (item_n[m] + prior_weight)
        scores[i] = math.log(ru / (1 - ru)) + math.log(rm / (1 - rm))
        y = labels[i]
        user_pos[u] += y
        user_n[u] += 1
        item_pos[m] += y
        item_n[m] += 1
        positives += y
    return scores
