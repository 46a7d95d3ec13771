"""The evaluation protocol of SYSTEM.md, and the running-mean baseline.

Progressive validation (the paper's protocol for real-time training): events in time
order; train one pass on the first 80%; then stream the last 20%, scoring each batch with
the current parameters *before* training on it; AUC over the scored events. The AUC of the
model frozen after the first 80% is measured on the same events, before the stream.

Hyper-parameters are chosen on a validation stream inside the first 80% and never on the
last 20%, which only reports: `validation_protocol` is the same protocol run on the first
80% alone (`tuning_data`), batch-training on its first three quarters (0-60% of the data)
and streaming the last quarter (60-80%). Whatever tunes (a sweep, a peer's grid) reads
only that figure.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np

from monolith.data.batch import Batch
from monolith.model.quality import auc, log_loss
from monolith.trainer.progress import Progress
from monolith.trainer.scoring_copy import ScoringCopy
from monolith.trainer.worker import TrainerWorker

REPORT_FRACTION = 0.8  # the last 20% of the data only reports
VALIDATION_FRACTION = 0.75  # of the first 80%: batch-train on 0-60%, stream 60-80%


def tuning_data(data: Batch) -> Batch:
    """The examples hyper-parameters may be chosen on: the first 80% by time."""
    return data.slice(0, round(len(data) * REPORT_FRACTION))


@dataclasses.dataclass(frozen=True)
class ProtocolResult:
    """AUCs and training speed of one protocol run."""

    frozen_auc: float
    progressive_auc: float
    train_examples: int
    eval_examples: int
    examples_per_s: float  # during the one-pass training on the first part
    final_train_loss: float
    # The progressive AUC of each scoring copy, by its refresh interval in events.
    refresh_auc: dict[int, float] = dataclasses.field(default_factory=dict)


def progressive_validation(
    worker: TrainerWorker,
    data: Batch,
    fraction: float = REPORT_FRACTION,
    label: str = "train",
    show_progress: bool = True,
    copies: Sequence[ScoringCopy] = (),
) -> ProtocolResult:
    """Runs the protocol with one worker.

    Args:
        worker: the trainer (its backends decide in-process or distributed).
        data: time-ordered examples.
        fraction: the part trained in batch mode.
        label: prefix of the progress lines.
        show_progress: print progress lines on stderr.
        copies: stale copies of the worker's parameters that also score the stream, each
            before the worker trains on a batch; each is refreshed when the stream starts,
            then every `interval` events (the sync-interval experiment). Their AUCs are in
            `refresh_auc`; they change nothing the worker learns.
    """
    cut = round(len(data) * fraction)
    train, stream = data.slice(0, cut), data.slice(cut, len(data))
    batch_size = worker.config.training.batch_size

    progress = Progress(f"{label}: batch training", len(train), enabled=show_progress)
    start = time.perf_counter()
    loss = math.nan
    for batch, result in worker.train_stream(train.batches(batch_size)):
        loss = result.loss
        progress.update(len(batch), result.loss, batch.labels, result.logits)
    elapsed = time.perf_counter() - start
    progress.close()

    frozen = np.concatenate([worker.predict(b) for b in stream.batches(batch_size)])
    frozen_auc = auc(stream.labels, frozen)

    progress = Progress(f"{label}: progressive", len(stream), enabled=show_progress)
    scores: list[np.ndarray] = []
    copy_scores: list[list[np.ndarray]] = [[] for _ in copies]
    for copy in copies:
        copy.refresh()
    for batch in stream.batches(worker.config.training.online_batch_size):
        for copy, out in zip(copies, copy_scores):
            out.append(copy.predict(batch))
        scored = worker.predict(batch)
        scores.append(scored)
        result = worker.train(batch)
        for copy in copies:
            copy.trained(len(batch))
        progress.update(len(batch), result.loss, batch.labels, scored)
    progress.close()
    return ProtocolResult(
        frozen_auc=frozen_auc,
        progressive_auc=auc(stream.labels, np.concatenate(scores)),
        train_examples=len(train),
        eval_examples=len(stream),
        examples_per_s=len(train) / elapsed,
        final_train_loss=loss,
        refresh_auc={copy.interval: auc(stream.labels, np.concatenate(out)) for copy, out in zip(copies, copy_scores)},
    )


def validation_protocol(worker: TrainerWorker, data: Batch, label: str = "validation", show_progress: bool = True,
                        copies: Sequence[ScoringCopy] = ()) -> ProtocolResult:  # fmt: skip
    """The protocol on the tuning part only: batch training on 0-60%, progressive validation over 60-80%.

    No example after the first 80% of `data` reaches the worker (nor its `copies`, as in
    `progressive_validation`).
    """
    return progressive_validation(worker, tuning_data(data), VALIDATION_FRACTION, label, show_progress, copies)


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
