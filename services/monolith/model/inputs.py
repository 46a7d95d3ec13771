"""From a batch's ids to the dense tower's inputs: the lookups trainers and serving share."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from monolith.model.config import ModelConfig
from monolith.model.backends import SparseBackend


def lookup_features(
    config: ModelConfig,
    sparse: SparseBackend,
    ids: Mapping[str, np.ndarray],
    row_splits: Mapping[str, np.ndarray],
    training: bool,
    update_time: float = 0.0,
    timeout: float | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Looks up every feature's embeddings (and bias terms) for a ragged batch.

    Args:
        config: the model config (which features, which tables).
        sparse: the embedding backend.
        ids: flat int64 ids per feature source.
        row_splits: int64 [batch + 1] per feature source.
        training: a training lookup (counts occurrences, creates rows) or a read-only one.
        update_time: data time stamped on rows a training lookup creates.
        timeout: seconds the lookup may take (a remote backend's calls), None the default.

    Returns:
        (embeddings per feature [n_ids, dim], bias terms per feature that has a bias
        table [n_ids, 1], the example index of each id occurrence per feature).
    """
    rows = sparse.lookup(feature_tables(config, ids), training=training, update_time=update_time, timeout=timeout)
    return feature_rows(config, rows, row_splits)


def feature_tables(config: ModelConfig, ids: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ids to look up per table: each feature's ids for its table and its bias table."""
    request = {f.table.name: ids[f.source] for f in config.features}
    request.update({f.bias_table.name: ids[f.source] for f in config.features if f.bias_table is not None})
    return request


def feature_rows(
    config: ModelConfig, rows: Mapping[str, np.ndarray], row_splits: Mapping[str, np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """`lookup_features`' answer from the rows a lookup of `feature_tables` gave."""
    embeddings = [rows[f.table.name] for f in config.features]
    biases = [rows[f.bias_table.name] for f in config.features if f.bias_table is not None]
    segments = [_segments(row_splits[f.source]) for f in config.features]
    return embeddings, biases, segments


def _segments(row_splits: np.ndarray) -> np.ndarray:
    """The example index of each id occurrence."""
    counts = np.diff(row_splits)
    return np.repeat(np.arange(counts.shape[0], dtype=np.int32), counts)
