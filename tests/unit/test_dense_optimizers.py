"""Dense optimizers against tf.keras.optimizers with the same hyper-parameters, and their config."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pydantic
import pytest
import tensorflow as tf

from monolith.common.config import parse_config
from monolith.common.errors import ConfigError
from monolith.dense_ps.optimizers import make_dense_optimizer
from monolith.model.config import DenseOptimizerConfig

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


def _keras(optimizer: tf.keras.optimizers.Optimizer, grads: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The same steps taken by a tf.keras optimizer on tf.Variables; a push may omit tensors."""
    params = {n: tf.Variable(p) for n, p in _start().items()}
    optimizer.build(list(params.values()))
    for g in grads:
        optimizer.apply_gradients([(tf.constant(g[n]), params[n]) for n in g])
    assert int(optimizer.iterations.numpy()) == len(grads)
    return {n: p.numpy() for n, p in params.items()}


# Each of our optimizers beside the tf.keras optimizer with the same hyper-parameters.
KERAS_PAIRS: list[tuple[str, DenseOptimizerConfig, Callable[[], tf.keras.optimizers.Optimizer]]] = [
    ("sgd", DenseOptimizerConfig(kind="sgd", learning_rate=0.1), lambda: tf.keras.optimizers.SGD(learning_rate=0.1)),
    (
        "adagrad",
        DenseOptimizerConfig(kind="adagrad", learning_rate=0.5, initial_accumulator=0.1, epsilon=1e-7),
        lambda: tf.keras.optimizers.Adagrad(learning_rate=0.5, initial_accumulator_value=0.1, epsilon=1e-7),
    ),
    (
        "adam",
        DenseOptimizerConfig(kind="adam", learning_rate=0.01, beta1=0.9, beta2=0.999, epsilon=1e-7),
        lambda: tf.keras.optimizers.Adam(learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-7),
    ),
    (
        "adam-defaults",
        DenseOptimizerConfig(),
        lambda: tf.keras.optimizers.Adam(),
    ),
]


@pytest.mark.parametrize(("config", "keras"), [p[1:] for p in KERAS_PAIRS], ids=[p[0] for p in KERAS_PAIRS])
def test_steps_match_tf_keras(config: DenseOptimizerConfig, keras: Callable[[], tf.keras.optimizers.Optimizer]) -> None:
    grads = _grads()

    _close(_run(config, grads), _keras(keras(), grads))


@pytest.mark.parametrize(("config", "keras"), [p[1:] for p in KERAS_PAIRS], ids=[p[0] for p in KERAS_PAIRS])
def test_a_tensor_skipped_by_a_push_steps_as_in_tf_keras(
    config: DenseOptimizerConfig, keras: Callable[[], tf.keras.optimizers.Optimizer]
) -> None:
    """The step count is the optimizer's, not the tensor's: Adam's bias correction for a
    tensor that missed the first push uses the global step, as tf.keras does."""
    grads = _grads()
    grads[0] = {"kernel": grads[0]["kernel"]}  # the first push carries no bias gradient

    _close(_run(config, grads), _keras(keras(), grads))


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
    assert DenseOptimizerConfig() == DenseOptimizerConfig(
        kind="adam", learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-7, initial_accumulator=0.1
    )
    assert parse_config(DenseOptimizerConfig, None, "model.optimizer") == DenseOptimizerConfig()
    assert parse_config(DenseOptimizerConfig, {}, "model.optimizer") == DenseOptimizerConfig()


def test_from_dict_reads_the_fields() -> None:
    raw = {"kind": "adagrad", "learning_rate": 0.3, "initial_accumulator": 0.0, "epsilon": 1e-6}

    config = parse_config(DenseOptimizerConfig, raw, "model.optimizer")

    assert config == DenseOptimizerConfig(kind="adagrad", learning_rate=0.3, initial_accumulator=0.0, epsilon=1e-6)


def test_constructor_errors_name_the_field() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"learning_rate"):
        DenseOptimizerConfig(learning_rate=-1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kind": "rmsprop"}, "model.optimizer.kind: input should be 'sgd', 'adagrad' or 'adam', got 'rmsprop'"),
        ({"learning_rate": 0}, "model.optimizer.learning_rate: input should be greater than 0, got 0"),
        ({"learning_rate": float("nan")}, "model.optimizer.learning_rate: input should be a finite number, got nan"),
        ({"learning_rate": "0.1"}, "model.optimizer.learning_rate: input should be a valid number, got '0.1'"),
        ({"beta1": 1.0}, "model.optimizer.beta1: input should be less than 1, got 1.0"),
        ({"beta2": -0.1}, "model.optimizer.beta2: input should be greater than or equal to 0, got -0.1"),
        ({"epsilon": 0}, "model.optimizer.epsilon: input should be greater than 0, got 0"),
        ({"initial_accumulator": -1}, "model.optimizer.initial_accumulator: input should be greater than or equal to 0"),
        ({"learning_rate": True}, "model.optimizer.learning_rate: input should be a valid number, got True"),
        ({"lr": 0.1}, "model.optimizer.lr: unknown field"),
        ([1, 2], "model.optimizer: input should be a valid dictionary"),
    ],
)
def test_from_dict_errors_name_the_field(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(DenseOptimizerConfig, raw, "model.optimizer")

    assert str(info.value).startswith(message)
