"""One trainer worker: a training step over a batch, and scoring.

A step: look up the batch's ids (deduped per table by the backend, with occurrence counts
for admission), run the dense tower forward and backward in TensorFlow with the cached
dense parameters, push sparse gradients (each id gets the sum of its examples'
gradients) and dense gradients, and refresh the dense parameters every k steps. Over a
stream of batches (`train_stream`) the next step's lookup rides with this step's sparse
push: one round trip per shard per step.
"""

from __future__ import annotations

from concurrent import futures
from typing import Iterable, Iterator

import numpy as np

from monolith.data.batch import Batch
from monolith.model.config import ModelConfig
from monolith.model.dense_model import DenseModel, StepResult
from monolith.model.inputs import feature_rows, feature_tables, lookup_features
from monolith.model.backends import DenseBackend, SparseBackend
from monolith.model.scores import sigmoid


# A batch's ids per source, and its embeddings, bias terms and segments per feature.
_LookedUp = tuple[dict[str, np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]


def _data_time(batch: Batch) -> float:
    """A batch's event time: its newest example's (0, none, for an empty batch)."""
    return float(batch.timestamps.max()) if len(batch) else 0.0


class TrainerWorker:
    """Trains and scores batches against a sparse and a dense backend.

    Args:
        config: the model config.
        sparse: where embeddings live (the embedding-PS shards, or local tables).
        dense: where dense parameters live (the dense-PS, or a local store).
    """

    def __init__(self, config: ModelConfig, sparse: SparseBackend, dense: DenseBackend) -> None:
        self.config = config
        self.model = DenseModel(config)
        self._sparse = sparse
        self._dense = dense
        self._version, self._params = dense.init(self.model.initial_parameters(config.training.seed))
        self.steps = 0
        self._dense_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dense-push")

    @property
    def dense_version(self) -> int:
        """Version of the cached dense parameters."""
        return self._version

    def train(self, batch: Batch) -> StepResult:
        """One training step; returns its logits (scored before the update) and loss."""
        result, _ = self._step(batch, self._lookup(batch, training=True, update_time=_data_time(batch)), None)
        return result

    def train_stream(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, StepResult]]:
        """Trains batch after batch, as `train` would one by one, yielding each with its result.

        Each step's lookup rides with the previous step's update (`apply_and_lookup`): one
        round trip per shard fewer per step, and the same parameters, since every shard
        applies the update before it answers the lookup. A consumer that stops early leaves
        the batch after the last one yielded looked up (its new ids counted for admission)
        but not trained.
        """
        upcoming = iter(batches)
        batch = next(upcoming, None)
        if batch is None:
            return
        looked_up = self._lookup(batch, training=True, update_time=_data_time(batch))
        for following in upcoming:
            result, looked_up = self._step(batch, looked_up, following)
            yield batch, result
            batch = following
        result, _ = self._step(batch, looked_up, None)
        yield batch, result

    def _step(self, batch: Batch, looked_up: _LookedUp, following: Batch | None) -> tuple[StepResult, _LookedUp | None]:
        """Trains `batch` on its looked-up rows; looks up `following` with the sparse update."""
        update_time = _data_time(batch)
        ids, embeddings, biases, segments = looked_up
        result = self.model.train_step(self._params, embeddings, biases, segments, batch.labels)
        gradients: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for feature, grads in zip(self.config.features, result.embedding_grads):
            gradients[feature.table.name] = (ids[feature.source], grads)
        for i, grads in zip(self.model.bias_features, result.bias_grads):
            feature = self.config.features[i]
            gradients[feature.bias_table.name] = (ids[feature.source], grads)  # type: ignore[union-attr]
        self.steps += 1
        refresh = self.steps % self.config.training.dense_refresh_steps == 0
        # The dense push (and pull) overlaps the sparse push: they go to different servers.
        # Both finish before the step returns, so the next step sees its own updates.
        dense = self._dense_pool.submit(self._push_dense, result.dense_grads, refresh)
        following_rows = None
        if following is None:
            self._sparse.apply_gradients(gradients, update_time)
        else:
            following_ids = {f.source: following.ids[f.source] for f in self.config.features}
            _, _, rows = self._sparse.apply_and_lookup(
                gradients, update_time, feature_tables(self.config, following_ids), True, _data_time(following)
            )
            following_rows = (following_ids, *feature_rows(self.config, rows, following.row_splits))
        dense.result()
        return result, following_rows

    def predict(self, batch: Batch) -> np.ndarray:
        """Probabilities for a batch with the current parameters; changes nothing."""
        _, embeddings, biases, segments = self._lookup(batch, training=False, update_time=0.0)
        return sigmoid(self.model.logits(self._params, embeddings, biases, segments, len(batch)))

    def _push_dense(self, grads: dict[str, np.ndarray], refresh: bool) -> None:
        if refresh:  # one call: the push answers with the parameters it left
            self._version, self._params = self._dense.push_pull(grads)
        else:
            self._dense.push(grads)

    def close(self) -> None:
        """Stops the helper thread."""
        self._dense_pool.shutdown(wait=True)

    def refresh_dense(self, force: bool = False) -> None:
        """Pulls the dense parameters if the PS has newer ones (any, with `force`: after a rollback)."""
        version, params = self._dense.pull(0 if force else self._version)
        if params is not None:
            self._version, self._params = version, params

    def _lookup(self, batch: Batch, training: bool, update_time: float) -> _LookedUp:
        ids = {f.source: batch.ids[f.source] for f in self.config.features}
        embeddings, biases, segments = lookup_features(
            self.config, self._sparse, ids, batch.row_splits, training, update_time
        )
        return ids, embeddings, biases, segments
