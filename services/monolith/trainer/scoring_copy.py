"""A stale copy of a trainer's parameters that scores: the serving copy, simulated in one process.

The paper measures how the interval at which serving receives the trained parameters
changes the AUC (its sync-interval experiment). Here the trainer trains on in-memory
tables; a `ScoringCopy` holds its own tables and dense parameters and is refreshed every
`interval` trained events with the train->serve sync's primitive: the rows each table
changed (and the ids it deleted) since the version of the previous refresh, plus the
dense parameters as the dense-PS holds them. Between refreshes it scores with what it
holds, as a serving replica does.
"""

from __future__ import annotations

import numpy as np

from monolith.data.batch import Batch
from monolith.model.config import ModelConfig
from monolith.model.dense_model import DenseModel
from monolith.model.inputs import lookup_features
from monolith.model.scores import sigmoid
from monolith.trainer.backends import LocalDense, LocalEmbeddings


class ScoringCopy:
    """Parameters copied from a trainer's local backends every `interval` trained events.

    Args:
        config: the model config.
        model: the trainer's dense tower (its graphs are reused; parameters are not).
        sparse: the trainer's in-memory tables, the source of every refresh.
        dense: the trainer's in-memory dense store.
        interval: trained events between refreshes (checked at step boundaries: the copy is
            refreshed before scoring a batch once at least `interval` events were trained on
            since the last refresh).
    """

    def __init__(self, config: ModelConfig, model: DenseModel, sparse: LocalEmbeddings, dense: LocalDense,
                 interval: int) -> None:  # fmt: skip
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.config = config
        self.interval = interval
        self.refreshes = 0
        self._model = model
        self._source, self._dense = sparse, dense
        self._tables = LocalEmbeddings(config.tables())
        self._params: dict[str, np.ndarray] = {}
        self._synced_version = 0  # the source's version the copy is complete up to
        self._trained_since_refresh = 0

    def refresh(self) -> None:
        """Takes every change of the trainer's tables since the last refresh, and its dense parameters."""
        self._synced_version = self._tables.follow(self._source, self._synced_version)
        _, params = self._dense.pull(0)
        assert params is not None  # pull(0) always returns the parameters
        self._params = params
        self._trained_since_refresh = 0
        self.refreshes += 1

    def trained(self, events: int) -> None:
        """Counts events the trainer trained on since the last refresh."""
        self._trained_since_refresh += events

    def predict(self, batch: Batch) -> np.ndarray:
        """Probabilities with the copy's parameters, refreshing first when `interval` events passed."""
        if self._trained_since_refresh >= self.interval:
            self.refresh()
        ids = {f.source: batch.ids[f.source] for f in self.config.features}
        embeddings, biases, segments = lookup_features(self.config, self._tables, ids, batch.row_splits, training=False)
        return sigmoid(self._model.logits(self._params, embeddings, biases, segments, len(batch)))
