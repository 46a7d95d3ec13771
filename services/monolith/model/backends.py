"""Where a model's parameters live, as trainers and serving see them: two small protocols.

`ShardedEmbeddingClient` and `DensePSClient` implement them over gRPC; the trainer's
`LocalEmbeddings` and `LocalDense` implement them in memory, for the single-process
reference run that distributed training is measured against.
"""

from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np


class SparseBackend(Protocol):
    """Embedding lookups and sparse gradient pushes, by table name."""

    def lookup(
        self,
        features: Mapping[str, np.ndarray],
        training: bool = False,
        update_time: float = 0.0,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Rows of ids per table; `timeout` (seconds) bounds a remote lookup, None the default."""

    def apply_gradients(
        self, gradients: Mapping[str, tuple[np.ndarray, np.ndarray]], update_time: float = 0.0
    ) -> tuple[int, int]: ...

    def apply_and_lookup(
        self,
        gradients: Mapping[str, tuple[np.ndarray, np.ndarray]],
        update_time: float,
        features: Mapping[str, np.ndarray],
        training: bool = True,
        lookup_update_time: float = 0.0,
    ) -> tuple[int, int, dict[str, np.ndarray]]:
        """`apply_gradients` then `lookup`, as one round trip where the backend is remote."""


class DenseBackend(Protocol):
    """Dense parameter init, pull and push."""

    def init(self, tensors: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]: ...

    def pull(self, if_newer_than: int = 0) -> tuple[int, dict[str, np.ndarray] | None]: ...

    def push(self, grads: Mapping[str, np.ndarray]) -> int: ...

    def push_pull(self, grads: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """`push`, answered with the version and every parameter as that push left them."""
