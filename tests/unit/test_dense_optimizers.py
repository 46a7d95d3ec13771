"""Dense optimizers against their textbook formulas, and their validated config."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from monolith.dense_ps.optimizers import (
    DenseOptimizerConfig,
    dense_optimizer_from_dict,
    make_dense_optimizer,
)
from monolith.embedding.config import ConfigError

SHAPES = {"kernel": (3, 2), "bias": (2,)}
STEPS = 4


def _start() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def _grads() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [{n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(STEPS)]


def _run(config: DenseOptimizerConfig, grads: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    params = _start()
    optimizer = make_dense_optimizer(config)
    optimizer.reset({n: p.shape for n, p in params.items()})
    for g in grads:
        optimizer.apply(params, g)
    assert optimizer.step == len(grads)
    return params


def _close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name in expected:
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_sgd_is_w_minus_lr_g() -> None:
    config = DenseOptimizerConfig(kind="sgd", learning_rate=0.1)
    grads = _grads()
    expected = {n: p.astype(np.float64) for n, p in _start().items()}
    for g in grads:
        for n in expected:
            expected[n] = expected[n] - 0.1 * g[n]

    _close(_run(config, grads), expected)


def test_adagrad_accumulates_squares_from_the_initial_accumulator() -> None:
    config = DenseOptimizerConfig(kind="adagrad", learning_rate=0.5, initial_accumulator=0.1, epsilon=1e-7)
    grads = _grads()
    w = {n: p.astype(np.float64) for n, p in _start().items()}
    acc = {n: np.full(s, 0.1) for n, s in SHAPES.items()}
    for g in grads:
        for n in w:
            acc[n] = acc[n] + g[n].astype(np.float64) ** 2
            w[n] = w[n] - 0.5 * g[n] / (np.sqrt(acc[n]) + 1e-7)

    _close(_run(config, grads), w)


def test_adam_matches_kingma_ba_with_keras_epsilon() -> None:
    """tf.keras folds the bias corrections into the step size, so epsilon meets sqrt(v), not sqrt(v_hat)."""
    b1, b2, lr, eps = 0.9, 0.999, 0.01, 1e-7
    config = DenseOptimizerConfig(kind="adam", learning_rate=lr, beta1=b1, beta2=b2, epsilon=eps)
    grads = _grads()
    w = {n: p.astype(np.float64) for n, p in _start().items()}
    m = {n: np.zeros(s) for n, s in SHAPES.items()}
    v = {n: np.zeros(s) for n, s in SHAPES.items()}
    for t, g in enumerate(grads, start=1):
        for n in w:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n].astype(np.float64) ** 2
            w[n] = w[n] - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m[n] / (np.sqrt(v[n]) + eps)

    _close(_run(config, grads), w)


def test_adam_steps_are_global_so_a_tensor_skipped_by_a_push_catches_up_with_the_later_step() -> None:
    """As in tf.keras: the step count is the optimizer's, not the tensor's."""
    b1, b2, lr, eps = 0.9, 0.999, 0.01, 1e-7
    grads = _grads()
    grads[0] = {"kernel": grads[0]["kernel"]}  # the first push carries no bias gradient
    w = _start()["bias"].astype(np.float64)
    m = v = np.zeros(2)
    for t, g in enumerate(grads[1:], start=2):
        m = b1 * m + (1 - b1) * g["bias"]
        v = b2 * v + (1 - b2) * g["bias"].astype(np.float64) ** 2
        w = w - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)

    got = _run(DenseOptimizerConfig(kind="adam", learning_rate=lr), grads)

    np.testing.assert_allclose(got["bias"], w, rtol=1e-5, atol=1e-6)


def test_a_zero_gradient_on_fresh_adam_state_leaves_parameters_finite() -> None:
    params = {"w": np.ones(3, np.float32)}
    optimizer = make_dense_optimizer(DenseOptimizerConfig(kind="adam"))
    optimizer.reset({"w": (3,)})

    optimizer.apply(params, {"w": np.zeros(3, np.float32)})

    np.testing.assert_array_equal(params["w"], np.ones(3, np.float32))


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_state_dict_round_trip_continues_identically(kind: str) -> None:
    config = DenseOptimizerConfig(kind=kind, learning_rate=0.05)
    grads = _grads()
    straight = _run(config, grads)

    params = _start()
    first = make_dense_optimizer(config)
    first.reset(SHAPES)
    for g in grads[:2]:
        first.apply(params, g)
    second = make_dense_optimizer(config)
    state = first.state_dict()
    second.load_state_dict(state, list(SHAPES))
    for g in grads[2:]:
        second.apply(params, g)

    assert set(state) == set(first.state_shapes(SHAPES))
    assert int(state["step"]) == 2
    for name in SHAPES:
        np.testing.assert_array_equal(params[name], straight[name])


# --------------------------------------------------------------------------- config


def test_defaults_are_keras_adam() -> None:
    assert DenseOptimizerConfig() == DenseOptimizerConfig("adam", 0.001, 0.9, 0.999, 1e-7, 0.1)
    assert dense_optimizer_from_dict(None, "model.optimizer") == DenseOptimizerConfig()
    assert dense_optimizer_from_dict({}, "model.optimizer") == DenseOptimizerConfig()


def test_from_dict_reads_the_fields() -> None:
    raw = {"kind": "adagrad", "learning_rate": 0.3, "initial_accumulator": 0.0, "epsilon": 1e-6}

    config = dense_optimizer_from_dict(raw, "model.optimizer")

    assert config == DenseOptimizerConfig(kind="adagrad", learning_rate=0.3, initial_accumulator=0.0, epsilon=1e-6)


def test_constructor_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^optimizer.learning_rate: must be a finite number > 0, got -1$"):
        DenseOptimizerConfig(learning_rate=-1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kind": "rmsprop"}, "model.optimizer.kind: must be one of sgd, adagrad, adam, got 'rmsprop'"),
        ({"learning_rate": 0}, "model.optimizer.learning_rate: must be a finite number > 0, got 0"),
        ({"learning_rate": float("nan")}, "model.optimizer.learning_rate: must be a finite number > 0, got nan"),
        ({"learning_rate": "0.1"}, "model.optimizer.learning_rate: must be a finite number > 0, got '0.1'"),
        ({"beta1": 1.0}, "model.optimizer.beta1: must be in [0, 1), got 1.0"),
        ({"beta2": -0.1}, "model.optimizer.beta2: must be in [0, 1), got -0.1"),
        ({"epsilon": 0}, "model.optimizer.epsilon: must be a finite number > 0, got 0"),
        ({"initial_accumulator": -1}, "model.optimizer.initial_accumulator: must be a finite number >= 0, got -1"),
        ({"learning_rate": True}, "model.optimizer.learning_rate: must be a finite number > 0, got True"),
        ({"lr": 0.1}, "model.optimizer: unknown field(s) lr; known: beta1, beta2, epsilon, initial_accumulator"),
        ([1, 2], "model.optimizer: must be a mapping, got list"),
    ],
)
def test_from_dict_errors_name_the_field(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        dense_optimizer_from_dict(raw, "model.optimizer")

    assert str(info.value).startswith(message)
