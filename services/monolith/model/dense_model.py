"""The dense tower in TensorFlow, as pure functions of named parameters.

The parameters live on the dense-PS (or in a local store), not in tf.Variables: a step
takes them as tensors, with the embeddings the trainer looked up, and returns gradients
for both. Embedding inputs are per id occurrence, `[n_ids, dim]`, with the example each
occurrence belongs to; the tower mean-pools them per example. The gradient it returns for
embeddings is that of the *summed* loss (each example's full gradient reaches its ids, so
sparse rows learn at per-example speed), while dense gradients are of the mean loss.

DeepFM (Guo et al. 2017): logit = global bias + sum of per-feature bias terms
  + FM second-order interactions of the feature embeddings + MLP(concatenated embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from monolith.model.config import ModelConfig

_ACTIVATIONS = {"relu": tf.nn.relu, "tanh": tf.nn.tanh, "sigmoid": tf.nn.sigmoid, "gelu": tf.nn.gelu}


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one training step returns (numpy)."""

    logits: np.ndarray  # float32 [batch]
    loss: float  # mean logloss over the batch
    dense_grads: dict[str, np.ndarray]  # of the mean loss
    embedding_grads: list[np.ndarray]  # per feature, [n_ids, dim], of the summed loss
    bias_grads: list[np.ndarray]  # per feature with a bias, [n_ids, 1], of the summed loss


class DenseModel:
    """DeepFM or MLP over the features of a ModelConfig."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.features = config.features
        self.bias_features = [i for i, f in enumerate(self.features) if f.bias is not None]
        self._activation = _ACTIVATIONS[config.model.activation]
        self._fm = config.model.kind == "deepfm"
        width = sum(f.table.dim for f in self.features)
        shapes: dict[str, tuple[int, ...]] = {"global_bias": (1,)}
        for i, units in enumerate(config.model.hidden_units):
            shapes[f"mlp/kernel_{i}"] = (width, units)
            shapes[f"mlp/bias_{i}"] = (units,)
            width = units
        shapes["mlp/kernel_out"] = (width, 1)
        shapes["mlp/bias_out"] = (1,)
        self.parameter_shapes = shapes
        self.parameter_names = tuple(shapes)
        self._sizes = [int(np.prod(shapes[n])) for n in self.parameter_names]
        self._dims = [f.table.dim for f in self.features]
        # The graphs take a handful of flat tensors rather than lists of them: tf.function's
        # per-argument binding costs ~0.1 ms per tensor, which dominated small batches.
        flat = tf.TensorSpec((None,), tf.float32)
        signature = (
            flat,  # dense parameters, concatenated in parameter_names order
            flat,  # embeddings of every feature, concatenated
            flat,  # biases of every feature with a bias table, concatenated
            tf.TensorSpec((None,), tf.int32),  # example of each id occurrence, concatenated
            tf.TensorSpec((None,), tf.int32),  # id occurrences per feature
            tf.TensorSpec((None,), tf.float32),  # labels
        )
        # Concrete functions, traced once: calling a tf.function re-checks its trace cache on
        # every call, which cost more than the step itself on small batches.
        self._train_step = tf.function(self._train_step_impl).get_concrete_function(*signature)
        self._forward = tf.function(self._forward_impl).get_concrete_function(
            *signature[:5], tf.TensorSpec((), tf.int32)
        )

    def initial_parameters(self, seed: int) -> dict[str, np.ndarray]:
        """Glorot-uniform kernels and zero biases, deterministic in `seed`."""
        rng = np.random.default_rng(seed)
        params = {}
        for name, shape in self.parameter_shapes.items():
            if "kernel" in name:
                limit = np.sqrt(6.0 / (shape[0] + shape[1]))
                params[name] = rng.uniform(-limit, limit, shape).astype(np.float32)
            else:
                params[name] = np.zeros(shape, np.float32)
        return params

    def train_step(
        self,
        params: dict[str, np.ndarray],
        embeddings: list[np.ndarray],
        biases: list[np.ndarray],
        segments: list[np.ndarray],
        labels: np.ndarray,
    ) -> StepResult:
        """Forward and backward on one batch.

        Args:
            params: dense parameters by name.
            embeddings: per feature, float32 [n_ids, dim], one row per id occurrence.
            biases: per feature with a bias table, float32 [n_ids, 1].
            segments: per feature, int32 [n_ids]: the example of each occurrence.
            labels: float32 [batch], 0 or 1.
        """
        logits, loss_sum, dense_flat, emb_flat, bias_flat = _call(
            self._train_step, (*self._pack(params, embeddings, biases, segments), np.asarray(labels, np.float32))
        )
        counts = [len(s) for s in segments]
        dense_grads = np.split(dense_flat.numpy(), np.cumsum(self._sizes)[:-1])
        emb_grads = np.split(emb_flat.numpy(), np.cumsum([n * d for n, d in zip(counts, self._dims)])[:-1])
        bias_grads = np.split(bias_flat.numpy(), np.cumsum([counts[i] for i in self.bias_features])[:-1])
        return StepResult(
            logits=logits.numpy(),
            loss=float(loss_sum.numpy()) / max(len(labels), 1),
            dense_grads={
                n: g.reshape(self.parameter_shapes[n]) for n, g in zip(self.parameter_names, dense_grads)
            },
            embedding_grads=[g.reshape(n, d) for g, n, d in zip(emb_grads, counts, self._dims)],
            bias_grads=[g.reshape(-1, 1) for g in bias_grads] if self.bias_features else [],
        )

    def logits(
        self,
        params: dict[str, np.ndarray],
        embeddings: list[np.ndarray],
        biases: list[np.ndarray],
        segments: list[np.ndarray],
        batch_size: int,
    ) -> np.ndarray:
        """Forward only: float32 [batch] logits."""
        return _call(self._forward, (*self._pack(params, embeddings, biases, segments), np.int32(batch_size))).numpy()

    def _pack(
        self,
        params: dict[str, np.ndarray],
        embeddings: list[np.ndarray],
        biases: list[np.ndarray],
        segments: list[np.ndarray],
    ) -> tuple[np.ndarray, ...]:
        def flat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
            if not arrays:
                return np.zeros(0, dtype)
            return np.concatenate([np.asarray(a, dtype).reshape(-1) for a in arrays])

        return (
            flat([params[n] for n in self.parameter_names], np.float32),
            flat(embeddings, np.float32),
            flat(biases, np.float32),
            flat(segments, np.int32),
            np.array([len(s) for s in segments], np.int32),
        )

    # ------------------------------------------------------------ TF graphs

    def _unpack(self, params, embeddings, biases, segments, counts):  # type: ignore[no-untyped-def]
        p = dict(zip(self.parameter_names, tf.split(params, self._sizes)))
        p = {n: tf.reshape(t, self.parameter_shapes[n]) for n, t in p.items()}
        emb = tf.split(embeddings, counts * tf.constant(self._dims, tf.int32), num=len(self._dims))
        emb = [tf.reshape(e, (-1, d)) for e, d in zip(emb, self._dims)]
        seg = tf.split(segments, counts, num=len(self._dims))
        if self.bias_features:
            bias = tf.split(biases, tf.gather(counts, self.bias_features), num=len(self.bias_features))
            bias = [tf.reshape(b, (-1, 1)) for b in bias]
        else:
            bias = []
        return p, emb, bias, seg

    def _forward_impl(self, params, embeddings, biases, segments, counts, batch_size):  # type: ignore[no-untyped-def]
        p, embeddings, biases, segments = self._unpack(params, embeddings, biases, segments, counts)
        return self._logits(p, embeddings, biases, segments, batch_size)

    def _logits(self, p, embeddings, biases, segments, batch_size):  # type: ignore[no-untyped-def]
        pooled = [tf.math.unsorted_segment_mean(e, s, batch_size) for e, s in zip(embeddings, segments)]
        logit = tf.fill([batch_size], p["global_bias"][0])
        for b, i in zip(biases, self.bias_features):
            logit += tf.math.unsorted_segment_mean(b, segments[i], batch_size)[:, 0]
        if self._fm:
            stacked = tf.stack(pooled, axis=1)  # [batch, features, dim]
            square_of_sum = tf.square(tf.reduce_sum(stacked, axis=1))
            sum_of_squares = tf.reduce_sum(tf.square(stacked), axis=1)
            logit += 0.5 * tf.reduce_sum(square_of_sum - sum_of_squares, axis=1)
        hidden = tf.concat(pooled, axis=1)
        for i in range(len(self.config.model.hidden_units)):
            hidden = self._activation(tf.matmul(hidden, p[f"mlp/kernel_{i}"]) + p[f"mlp/bias_{i}"])
        logit += (tf.matmul(hidden, p["mlp/kernel_out"]) + p["mlp/bias_out"])[:, 0]
        return logit

    def _train_step_impl(self, params, embeddings, biases, segments, counts, labels):  # type: ignore[no-untyped-def]
        batch_size = tf.shape(labels)[0]
        with tf.GradientTape() as tape:
            tape.watch([params, embeddings, biases])
            logits = self._forward_impl(params, embeddings, biases, segments, counts, batch_size)
            loss_sum = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
        dense_grads, emb_grads, bias_grads = tape.gradient(
            loss_sum, [params, embeddings, biases], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        dense_grads = dense_grads / tf.cast(tf.maximum(batch_size, 1), tf.float32)
        return logits, loss_sum, dense_grads, emb_grads, bias_grads


def _call(function: Any, arrays: tuple[np.ndarray, ...]) -> Any:
    """Runs a concrete function on arrays already of its input dtypes, in its flat order.

    `ConcreteFunction.__call__` binds every argument to its signature and converts it in
    Python (canonicalize, bind, `TensorSpec.cast`): measured here, a third of a 100-example
    forward pass and a quarter of a training step. The arrays are the graph's flat inputs
    already, so they are made tensors and handed to the graph directly.
    """
    return function._call_flat([tf.constant(a) for a in arrays], function.captured_inputs)  # noqa: SLF001
