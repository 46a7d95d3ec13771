"""The model frozen right after the batch stage, copied out of the stack and scored here.

The copy is taken the way a checkpoint would be: every training shard's rows through the
embedding-PS Export RPC (embeddings only, as the train→serve sync sends them) and the dense
parameters through a dense-PS Pull. They go into in-memory tables and a local dense store
behind the same `ServingModel` model-serving runs, so the frozen scores differ from the
served ones only by what online training changed afterwards.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from monolith.data.batch import Batch
from monolith.dense_ps.client import DensePSClient
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import ModelConfig
from monolith.serving.model import ServingModel
from monolith.trainer.backends import LocalDense, LocalEmbeddings

SCORE_BATCH = 1024
_IMPORT_VERSION = 1  # the local tables' version of the copy (nothing else writes them)


@dataclasses.dataclass(frozen=True)
class FrozenCopy:
    """What the copy holds.

    Attributes:
        model: scores requests with the copied parameters.
        rows: rows copied, per table.
        dense_version: the dense-PS version copied.
    """

    model: ServingModel
    rows: dict[str, int]
    dense_version: int

    def score(self, batch: Batch) -> np.ndarray:
        """Served probabilities (same calibration as model-serving) for examples, in order."""
        parts = [self.model.score(b.ids, b.row_splits, len(b)) for b in batch.batches(SCORE_BATCH)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def freeze(config: ModelConfig, sparse: ShardedEmbeddingClient, dense: DensePSClient) -> FrozenCopy:
    """Copies the training shards' tables and the dense parameters into this process.

    Call it while nothing trains, or the copy mixes versions (each shard's export is
    consistent per table; the dense pull is one version).
    """
    tables = LocalEmbeddings(config.tables())
    rows = {name: 0 for name in tables.tables}
    for shard in range(sparse.num_shards):
        for chunk in sparse.export(shard, since_version=0):
            tables.tables[chunk.table].upsert(chunk.rows, _IMPORT_VERSION)
            rows[chunk.table] += chunk.num_rows
    version, params = dense.pull(0)
    if params is None:
        raise RuntimeError("the dense-PS holds no parameters to freeze")
    local_dense = LocalDense(config.model.optimizer)
    local_dense.init({name: np.array(value) for name, value in params.items()})
    model = ServingModel(config, tables, local_dense)
    model.refresh_dense()
    return FrozenCopy(model=model, rows=rows, dense_version=version)
