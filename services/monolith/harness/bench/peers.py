"""The field's standard online learners, run on the project's own examples in the same order.

Peers of the project's model in `monolith bench train`:
- online logistic regression on per-id bias terms only, updated per example with Adagrad;
- Vowpal Wabbit (the `vowpalwabbit` wheel, the `bench` extra), one pass, per example:
  linear, `-q ui` (every user-side x item-side pair) and `--lrq ui8` (rank-8 user x
  item interactions), each at learning rates 0.1 / 0.3 / 0.5.

Both read `PeerExamples`, built once from a `Batch`: per example, its label and, per
feature, the example's ids with the value 1/k each (a multi-valued feature of k ids is
mean-pooled, as the project's model pools it), in the namespace of its side (`u` for the
user's features, `i` for the item's). Each learner scores an event before it trains on
it, from the first event on: one pass over the first part is its batch training and the
rest is progressive validation, the project's protocol for a learner that steps per
example.

Hyper-parameters are chosen on the validation stream (`choose_on_validation`): the
learner runs over the tuning part only (the first 80%), and its AUC over the last quarter
of that part decides; the chosen point is then run over all the data and scored on the
last 20%.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence, TypeVar

import numba
import numpy as np

from monolith.data.batch import Batch
from monolith.trainer.evaluation import REPORT_FRACTION, VALIDATION_FRACTION, tuning_data
from monolith.model.quality import auc

ITEM_FEATURES = ("movie_id", "genres")  # the item's side; every other feature is the user's
LEARNING_RATES = (0.1, 0.3, 0.5)
VW_INTERACTIONS = {"linear": "", "quadratic": "-q ui", "lrq": "--lrq ui8"}
VW_COMMON = "--loss_function logistic --quiet --bit_precision 22 --random_seed 0"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class PeerExamples:
    """Examples as sparse linear features, one entry per (example, feature, id).

    Attributes:
        features: the feature of each entry, by its position in `feature_names`.
        ids: int64, the id of each entry (the project's feature ids).
        values: float64, 1/k for each of an example's k ids of one feature.
        splits: int64 [n + 1], where each example's entries start and end.
        labels: float32 [n], 1.0 for a positive example.
        feature_names: the batch's features, in its order.
    """

    features: np.ndarray
    ids: np.ndarray
    values: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    feature_names: tuple[str, ...]

    @staticmethod
    def from_batch(batch: Batch) -> PeerExamples:
        """Each example's features, in the batch's feature order, its ids in their order."""
        n, names = len(batch), batch.features
        counts = np.stack([np.diff(batch.row_splits[f]) for f in names], axis=1)  # [n, features]
        splits = np.zeros(n + 1, np.int64)
        np.cumsum(counts.sum(axis=1), out=splits[1:])
        # Entry order: example-major, then feature, then the feature's ids in order.
        example = np.repeat(np.arange(n), counts.sum(axis=1))
        feature = np.repeat(np.tile(np.arange(len(names)), n), counts.reshape(-1))
        # Position of each entry among its (example, feature)'s ids, to gather from that feature's flat ids.
        group_start = np.repeat(np.cumsum(counts.reshape(-1)) - counts.reshape(-1), counts.reshape(-1))
        rank = np.arange(splits[-1]) - group_start
        ids = np.empty(splits[-1], np.int64)
        for f, name in enumerate(names):
            mask = feature == f
            ids[mask] = batch.ids[name][batch.row_splits[name][example[mask]] + rank[mask]]
        values = 1.0 / np.repeat(counts.reshape(-1), counts.reshape(-1)).astype(np.float64)
        return PeerExamples(feature, ids, values, splits, batch.labels.copy(), tuple(names))

    def __len__(self) -> int:
        return len(self.labels)

    def vw_lines(self) -> list[str]:
        """One Vowpal Wabbit text example per example: `<+1|-1> |u name=id:value .. |i ..`."""
        sides = [("i" if name in ITEM_FEATURES else "u") for name in self.feature_names]
        tokens = [
            f"{self.feature_names[f]}={i}" + ("" if v == 1.0 else f":{v:.6g}")
            for f, i, v in zip(self.features.tolist(), self.ids.tolist(), self.values.tolist())
        ]
        lines = []
        for e, (start, stop) in enumerate(zip(self.splits[:-1].tolist(), self.splits[1:].tolist())):
            by_side: dict[str, list[str]] = {"u": [], "i": []}
            for k in range(start, stop):
                by_side[sides[self.features[k]]].append(tokens[k])
            label = "1" if self.labels[e] > 0.5 else "-1"
            lines.append(f"{label} |u {' '.join(by_side['u'])} |i {' '.join(by_side['i'])}")
        return lines


# --------------------------------------------------------------- bias-only logistic regression


@numba.njit(cache=True)
def _bias_lr_pass(rows, values, splits, labels, learning_rate, initial_accumulator):  # type: ignore[no-untyped-def]
    weights = np.zeros(rows.max() + 2)  # the last slot is the global bias
    accumulators = np.full(rows.max() + 2, initial_accumulator)
    global_bias = weights.shape[0] - 1
    scores = np.empty(labels.shape[0])
    for e in range(labels.shape[0]):
        logit = weights[global_bias]
        for k in range(splits[e], splits[e + 1]):
            logit += weights[rows[k]] * values[k]
        scores[e] = logit  # scored before the update
        g = 1.0 / (1.0 + math.exp(-logit)) - labels[e]
        accumulators[global_bias] += g * g
        weights[global_bias] -= learning_rate * g / math.sqrt(accumulators[global_bias])
        for k in range(splits[e], splits[e + 1]):
            gk = g * values[k]
            accumulators[rows[k]] += gk * gk
            weights[rows[k]] -= learning_rate * gk / math.sqrt(accumulators[rows[k]])
    return scores


def bias_lr_scores(examples: PeerExamples, learning_rate: float, initial_accumulator: float = 0.1) -> np.ndarray:
    """Progressive logits of online logistic regression on per-id bias terms, one per example.

    One weight per (feature, id) and a global bias, all starting at 0; each example is
    scored, then every weight it touched takes one Adagrad step (accumulators start at
    `initial_accumulator`).
    """
    pairs = np.stack([examples.features.astype(np.int64), examples.ids], axis=1)
    _, rows = np.unique(pairs, axis=0, return_inverse=True)  # one weight per distinct (feature, id)
    return _bias_lr_pass(rows.astype(np.int64), examples.values, examples.splits,
                         examples.labels.astype(np.float64), learning_rate, initial_accumulator)  # fmt: skip


# --------------------------------------------------------------- Vowpal Wabbit


def vw_arguments(interaction: str, learning_rate: float) -> str:
    """The VW command line of one grid point."""
    return " ".join(filter(None, [VW_COMMON, VW_INTERACTIONS[interaction], f"--learning_rate {learning_rate}"]))


def vw_scores(lines: Sequence[str], arguments: str) -> np.ndarray:
    """Progressive raw scores of one VW model over `lines`: each predicted, then learned."""
    from vowpalwabbit import Workspace  # the bench extra; imported only when VW runs

    workspace = Workspace(arguments)
    try:
        scores = np.empty(len(lines))
        for k, line in enumerate(lines):
            scores[k] = workspace.predict(line)
            workspace.learn(line)
        return scores
    finally:
        workspace.finish()


# --------------------------------------------------------------- choosing on validation


@dataclasses.dataclass(frozen=True)
class PeerResult:
    """A peer's grid point chosen on validation and its AUCs."""

    config: str
    validation_auc: float  # over the last quarter of the first 80%: what chose the config
    progressive_auc: float  # over the last 20%, after one pass over the first 80%
    grid: dict[str, float]  # every grid point's validation AUC


def validation_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC over the last quarter of a run over the tuning part (60-80% of the data)."""
    cut = round(len(labels) * VALIDATION_FRACTION)
    return auc(labels[cut:], scores[cut:])


def report_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC over the last 20% of a run over all the data."""
    cut = round(len(labels) * REPORT_FRACTION)
    return auc(labels[cut:], scores[cut:])


def choose_on_validation(
    grid: dict[str, Callable[[T], np.ndarray]], prepare: Callable[[Batch], T], data: Batch
) -> PeerResult:
    """Runs every grid point over the tuning part, then the best over all of `data`.

    Args:
        grid: name -> a function returning a learner's progressive scores over prepared
            examples, one per example, in order.
        prepare: turns a batch into the learner's input (once per batch, for every point).
        data: all the examples, in time order.
    """
    tuning = tuning_data(data)
    prepared = prepare(tuning)
    figures = {name: validation_auc(run(prepared), tuning.labels) for name, run in grid.items()}
    best = max(figures, key=lambda name: figures[name])
    return PeerResult(best, figures[best], report_auc(grid[best](prepare(data)), data.labels), figures)


def run_bias_lr(data: Batch) -> PeerResult:
    """Per-example Adagrad at each learning rate of the grid, chosen on validation."""
    grid: dict[str, Callable[[PeerExamples], np.ndarray]] = {
        f"adagrad lr {lr}": (lambda examples, lr=lr: bias_lr_scores(examples, lr)) for lr in LEARNING_RATES
    }
    return choose_on_validation(grid, PeerExamples.from_batch, data)


def run_vw(data: Batch) -> PeerResult:
    """Linear, `-q ui` and `--lrq ui8`, each at each learning rate of the grid, chosen on validation."""
    grid: dict[str, Callable[[list[str]], np.ndarray]] = {
        vw_arguments(kind, lr): (lambda lines, a=vw_arguments(kind, lr): vw_scores(lines, a))
        for kind in VW_INTERACTIONS
        for lr in LEARNING_RATES
    }
    return choose_on_validation(grid, lambda batch: PeerExamples.from_batch(batch).vw_lines(), data)
