"""Batch training: one pass over a stored dataset, the way `monolith trainer` (batch mode) and the replay's batch stage train."""

from __future__ import annotations

import itertools
import logging
import math
import threading

from monolith.data.batch import Batch
from monolith.model.scores import sigmoid
from monolith.trainer.progress import Progress
from monolith.trainer.worker import TrainerWorker

_LOGGER = logging.getLogger("monolith.trainer")


def train_pass(worker: TrainerWorker, data: Batch, index: int, count: int, stop: threading.Event) -> dict:
    """One pass over this worker's share of the batches, until done or `stop` is set."""
    batches = [b for i, b in enumerate(data.batches(worker.config.training.batch_size)) if i % count == index]
    progress = Progress(f"trainer {index}/{count}", sum(len(b) for b in batches))
    loss = math.nan
    # `stop` is checked as each batch is taken, before its lookup rides with the step before.
    for batch, result in worker.train_stream(itertools.takewhile(lambda _: not stop.is_set(), batches)):
        loss = result.loss
        progress.update(len(batch), result.loss, batch.labels, sigmoid(result.logits))
    if stop.is_set():
        _LOGGER.info("stopping after %d examples", progress.examples)
    progress.close()
    return {
        "examples": progress.examples,
        "steps": worker.steps,
        "examples_per_s": round(progress.examples_per_s, 1),
        "last_loss": loss,
        "running_auc": progress.running_auc(),
        "dense_version": worker.dense_version,
    }
