"""The served model, with no gRPC in it: request features in, calibrated probabilities out.

Features arrive as one array per feature (the Predict inputs): shape `[batch]`, or
`[batch, k]` for a multi-valued feature (string tensors may pad rows with ""), where an
outer size of 1 is broadcast across the batch, so a ranking call sends the user's
features once and N candidates' features. Raw values (ints or strings) map to ids with
the same stable per-feature hash the training data went through. Ids are looked up in
the serving embedding-PS (read-only: unknown ids read as zeros), the dense tower runs in
TensorFlow, and the log-odds correction for negative down-sampling is applied:
a model trained on data keeping a fraction r of negatives overestimates the odds by 1/r,
so the served logit is the model's logit + log(r).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable, Mapping

import numpy as np

from monolith.common.errors import InvalidArgument, Unavailable
from monolith.common.periodic import PeriodicTask
from monolith.data.feature_ids import FeatureIdCache
from monolith.model.config import ModelConfig
from monolith.model.dense_model import DenseModel
from monolith.model.inputs import lookup_features
from monolith.model.backends import DenseBackend, SparseBackend
from monolith.model.scores import sigmoid
from monolith.serving.limits import NO_DEADLINE, Deadline, RequestLimits

_LOGGER = logging.getLogger("monolith.serving")
MAX_BATCH = RequestLimits().max_batch


class ServingModel:
    """Scores requests with the serving tables and the latest dense parameters pulled.

    Args:
        config: the model config.
        sparse: the serving embedding-PS shards (or local tables), used read-only.
        dense: where to pull dense parameters from (the dense-PS).
        limits: how much work one request may cause.
    """

    def __init__(
        self, config: ModelConfig, sparse: SparseBackend, dense: DenseBackend, limits: RequestLimits = RequestLimits()
    ) -> None:
        self.config = config
        self.limits = limits
        self.model = DenseModel(config)
        self._sparse = sparse
        self._dense = dense
        self._lock = threading.Lock()
        # (version, parameters), replaced as one so a request sees the version that scored it.
        self._dense_state: tuple[int, dict[str, np.ndarray]] | None = None
        self._dense_incarnation = ""  # the dense-PS incarnation _dense_state came from
        self._log_odds_shift = math.log(config.training.negative_sample_rate)
        self.input_names = tuple(f.source for f in config.features)
        self._features = {f.source: f for f in config.features}
        self._feature_ids = FeatureIdCache()

    @property
    def ready(self) -> bool:
        """Whether dense parameters have been loaded."""
        return self._dense_state is not None

    @property
    def dense_version(self) -> int:
        state = self._dense_state
        return 0 if state is None else state[0]

    def refresh_dense(self) -> bool:
        """Pulls dense parameters if the dense-PS has newer ones; returns whether it did.

        A restarted or restored dense-PS is a new incarnation whose versions mean nothing
        against the one held, so its parameters are taken whatever their version; one
        that is not initialized or restored yet answers with an error, and the model
        keeps the parameters it has.
        """
        pull_incarnation = getattr(self._dense, "pull_incarnation", None)
        if pull_incarnation is None:  # an in-process store: one incarnation for good
            version, params = self._dense.pull(self.dense_version)
            incarnation = ""
        else:
            incarnation, version, params = pull_incarnation(self.dense_version, self._dense_incarnation)
        if params is None:
            return False
        with self._lock:
            self._dense_state = (version, params)
            self._dense_incarnation = incarnation
        return True

    def predict(self, inputs: Mapping[str, np.ndarray], deadline: Deadline = NO_DEADLINE) -> np.ndarray:
        """Calibrated probabilities, float32 [batch], for one request's features.

        Raises:
            InvalidArgument: see `parse`.
            DeadlineExceeded: `deadline` passed between two stages (hashing, lookup, tower).
        """
        deadline.check("before parsing the features")
        ids, row_splits, batch = self.parse(inputs)
        return self.score(ids, row_splits, batch, deadline)

    def score(
        self,
        ids: Mapping[str, np.ndarray],
        row_splits: Mapping[str, np.ndarray],
        batch: int,
        deadline: Deadline = NO_DEADLINE,
    ) -> np.ndarray:
        """Probabilities for parsed, ragged features (see `parse`)."""
        return self.score_versioned(ids, row_splits, batch, deadline)[0]

    def score_versioned(
        self,
        ids: Mapping[str, np.ndarray],
        row_splits: Mapping[str, np.ndarray],
        batch: int,
        deadline: Deadline = NO_DEADLINE,
    ) -> tuple[np.ndarray, int]:
        """`score`, and the dense parameter version that scored."""
        state = self._dense_state
        if state is None:
            raise Unavailable("the model has no dense parameters yet (the dense-PS is not initialized)")
        version, params = state
        deadline.check("before the embedding lookup")
        # The shards' calls give up when the client does, not only after the PS timeout.
        embeddings, biases, segments = lookup_features(
            self.config, self._sparse, ids, row_splits, training=False, timeout=deadline.remaining()
        )
        deadline.check("before the dense tower")
        logits = self.model.logits(params, embeddings, biases, segments, batch)
        return sigmoid(logits + self._log_odds_shift), version

    def parse(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
        """Checks the request's features and turns them into ragged ids.

        Returns:
            (flat int64 ids per feature, int64 row_splits per feature, batch size).

        Raises:
            InvalidArgument: a feature is missing or unknown, shapes do not line up, or the
                batch or the elements after broadcasting exceed `limits`.
        """
        unknown = sorted(set(inputs) - set(self._features))
        if unknown:
            raise InvalidArgument(
                f"unknown input(s) {', '.join(unknown)}; the signature's inputs are "
                f"{', '.join(self.input_names)}, request_id and event_time"
            )
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InvalidArgument(f"missing input(s) {', '.join(missing)}; every feature must be sent")
        arrays = {name: np.asarray(a) for name, a in inputs.items()}
        for name, array in arrays.items():
            if array.ndim not in (1, 2):
                raise InvalidArgument(
                    f"input {name!r}: expects shape [batch] or [batch, k], got {list(array.shape)}"
                )
            if array.shape[0] == 0:
                raise InvalidArgument(f"input {name!r}: outer dimension is 0; send at least one example")
        batch = max(a.shape[0] for a in arrays.values())
        if batch > self.limits.max_batch:
            raise InvalidArgument(f"batch of {batch} examples; at most {self.limits.max_batch} per request")
        # Broadcasting multiplies what was sent: a [1, k] tensor becomes [batch, k].
        elements = sum(batch * (a.shape[1] if a.ndim == 2 else 1) for a in arrays.values())
        if elements > self.limits.max_elements:
            raise InvalidArgument(
                f"the inputs hold {elements} elements over a batch of {batch} (after broadcasting); at most "
                f"{self.limits.max_elements} are accepted per request"
            )
        ids, row_splits = {}, {}
        for name, array in arrays.items():
            if array.shape[0] not in (1, batch):
                sizes = ", ".join(f"{n}: {a.shape[0]}" for n, a in arrays.items())
                raise InvalidArgument(
                    f"input {name!r}: outer dimension {array.shape[0]} is neither 1 (broadcast) nor the batch "
                    f"size {batch} ({sizes})"
                )
            if array.ndim == 2 and array.shape[1] != 1 and not self._features[name].multi_valued:
                raise InvalidArgument(
                    f"input {name!r}: the feature is single-valued; expects shape [batch], got {list(array.shape)}"
                )
            values, counts = _flatten(array)
            feature_ids = self._feature_ids(name, values)
            if array.shape[0] == 1 and batch > 1:
                # Sent once for the call (the user's features): hashed once, then repeated.
                feature_ids = np.tile(feature_ids, batch)
                counts = np.repeat(counts, batch)
            ids[name] = feature_ids
            row_splits[name] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return ids, row_splits, batch


def _flatten(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and per-example counts; "" pads rows of string tensors."""
    if array.dtype.kind == "S":
        array = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
    elif array.dtype.kind == "U":
        array = array.astype(object)
    if array.ndim == 1:
        return array, np.ones(array.shape[0], dtype=np.int64)
    if array.dtype == object:
        keep = array != ""
        return array[keep], keep.sum(axis=1)
    return array.reshape(-1), np.full(array.shape[0], array.shape[1], dtype=np.int64)


def dense_refresher(model: ServingModel, interval: float, on_ready: Callable[[], None]) -> PeriodicTask:
    """Pulls dense parameters every `interval` seconds (not started).

    Until the first parameters arrive it retries every half second, then calls `on_ready`
    once. A failed pull is logged once per outage; the model keeps serving the parameters
    it has.
    """
    failing = False

    def refresh() -> float | None:
        nonlocal failing
        was_ready = model.ready
        try:
            if model.refresh_dense():
                _LOGGER.info("dense parameters at version %d", model.dense_version)
            if failing:
                _LOGGER.info("dense-PS reachable again")
            failing = False
        except Exception as exc:  # noqa: BLE001 - any failure: keep serving the old parameters
            if not failing:
                _LOGGER.warning("dense refresh failed (serving the previous parameters): %s", exc)
            failing = True
        if not was_ready and model.ready:
            on_ready()
        return None if model.ready else min(interval, 0.5)

    return PeriodicTask("dense-refresh", interval, refresh)
