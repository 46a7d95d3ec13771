"""The hashing trick, for comparison: every feature's ids folded into a fixed number of buckets.

Monolith's point is the collisionless table (each id owns its row). The ablation that
shows what that buys replaces each id by `id mod buckets` before training, so distinct
ids of one feature share rows as they would in a fixed-size hashed table. Feature ids are
already uniform 64-bit hashes (`feature_ids`), so the remainder is a uniform bucket.
"""

from __future__ import annotations

import numpy as np

from monolith.data.batch import Batch


def hashed_into_buckets(batch: Batch, buckets: int) -> Batch:
    """The same examples with each feature's ids replaced by their bucket in [0, buckets).

    Each feature keeps its own table, so buckets are per feature (slot), as in a hashed
    embedding table per slot.

    Raises:
        ValueError: if buckets < 1.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    ids = {name: np.mod(flat, np.int64(buckets)) for name, flat in batch.ids.items()}
    return Batch(ids, batch.row_splits, batch.labels, batch.timestamps)
