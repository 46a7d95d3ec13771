"""Optimizers of the dense tower: whole-tensor numpy updates on named float32 tensors.

Unlike the sparse optimizers of the embedding tables, which step each row on its own,
these step every pushed tensor at once and keep one step count per parameter server, as
tf.keras optimizers do. Each tensor has its own state (Adagrad's accumulator, Adam's
moments), held in float32 like the parameters.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from monolith.model.config import DenseOptimizerConfig

STEP_KEY = "step"  # the optimizer-state entry holding the step count


class DenseOptimizer:
    """One optimizer and its state for a set of named tensors.

    Subclasses name their per-tensor state (`STATE`) and implement `_update`.

    Attributes:
        config: the hyperparameters.
        step: optimizer steps taken (pushes applied), shared by all tensors.
        state: per tensor, its state arrays by name (same shape as the tensor).
    """

    STATE: tuple[str, ...] = ()

    def __init__(self, config: DenseOptimizerConfig) -> None:
        self.config = config
        self.step = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def reset(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Fresh state for these tensors, step 0."""
        self.step = 0
        self.state = {name: {s: self._initial(s, shape) for s in self.STATE} for name, shape in shapes.items()}

    def apply(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """One step: updates `params[name]` in place for every gradient given.

        The caller has checked that every gradient names a tensor and has its shape.
        """
        self.step += 1
        for name, grad in grads.items():
            self._update(params[name], np.asarray(grad, np.float32), self.state[name])

    def state_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The entries `state_dict` has for tensors of these shapes, with their shapes."""
        out: dict[str, tuple[int, ...]] = {STEP_KEY: ()}
        for name, shape in shapes.items():
            out.update({state_key(name, s): tuple(shape) for s in self.STATE})
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the state as flat arrays: "<tensor>/<state>" entries plus "step"."""
        out = {STEP_KEY: np.array(self.step, np.int64)}
        for name, arrays in self.state.items():
            out.update({state_key(name, s): a.copy() for s, a in arrays.items()})
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray], names: list[str]) -> None:
        """Replaces the state with a `state_dict` of tensors `names` (already checked)."""
        self.step = int(state[STEP_KEY])
        self.state = {
            name: {s: np.array(state[state_key(name, s)], np.float32) for s in self.STATE} for name in names
        }

    def _initial(self, state: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


def state_key(tensor: str, state: str) -> str:
    """The flat key of one tensor's state array. State names hold no "/", so keys are unique."""
    return f"{tensor}/{state}"


class Sgd(DenseOptimizer):
    """w -= lr * g."""

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray]) -> None:
        param -= self.config.learning_rate * grad


class Adagrad(DenseOptimizer):
    """acc += g²; w -= lr * g / (sqrt(acc) + eps)."""

    STATE = ("accumulator",)

    def _initial(self, state: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.full(shape, self.config.initial_accumulator, np.float32)

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray]) -> None:
        acc = state["accumulator"]
        acc += grad * grad
        param -= self.config.learning_rate * grad / (np.sqrt(acc) + self.config.epsilon)


class Adam(DenseOptimizer):
    """Adam with bias correction folded into the step size, as tf.keras computes it.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g²;
    w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), with t the PS's step.
    """

    STATE = ("m", "v")

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray]) -> None:
        c = self.config
        m, v = state["m"], state["v"]
        m *= c.beta1
        m += (1.0 - c.beta1) * grad
        v *= c.beta2
        v += (1.0 - c.beta2) * grad * grad
        alpha = c.learning_rate * math.sqrt(1.0 - c.beta2**self.step) / (1.0 - c.beta1**self.step)
        param -= alpha * m / (np.sqrt(v) + c.epsilon)


def make_dense_optimizer(config: DenseOptimizerConfig) -> DenseOptimizer:
    """The optimizer of `config.kind`, with no tensors yet."""
    return {"sgd": Sgd, "adagrad": Adagrad, "adam": Adam}[config.kind](config)
