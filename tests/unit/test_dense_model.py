"""The dense tower: gradients against finite differences, forward consistency, ragged inputs.

The model computes in float32, so gradients are checked against central differences of
its own forward pass (`DenseModel.logits`) with a step large enough to rise above float32
rounding and a tanh tower so no ReLU kink sits inside a step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from monolith.model.config import ModelConfig, model_config_from_dict
from monolith.model.dense_model import DenseModel

EPS = 1e-2
LABELS = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
# Ragged row_splits per feature: genres is multi-valued and example 1 has no genre at all.
ROW_SPLITS = {
    "user": np.array([0, 1, 2, 3, 4]),
    "item": np.array([0, 1, 2, 3, 4]),
    "genres": np.array([0, 2, 2, 5, 6]),
}


def tiny_config(kind: str = "deepfm", activation: str = "tanh") -> ModelConfig:
    bias = {"optimizer": {"kind": "sgd", "learning_rate": 0.1}}
    return model_config_from_dict(
        {
            "features": [
                {"name": "user", "dim": 3, "bias": bias},
                {"name": "item", "dim": 3},
                {"name": "genres", "dim": 3, "multi_valued": True, "bias": bias},
            ],
            "model": {"kind": kind, "hidden_units": [4], "activation": activation},
        }
    )


def segments_of(row_splits: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(row_splits) - 1, dtype=np.int32), np.diff(row_splits))


Inputs = tuple[dict[str, np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]


def random_inputs(model: DenseModel, row_splits: dict[str, np.ndarray], seed: int = 1) -> Inputs:
    """Random dense parameters (biases too, so no gradient is trivially at a zero), rows and segments."""
    rng = np.random.default_rng(seed)
    params = {n: rng.normal(0, 0.5, s).astype(np.float32) for n, s in model.parameter_shapes.items()}
    names = [f.name for f in model.features]
    embeddings = [rng.normal(0, 0.5, (int(row_splits[n][-1]), 3)).astype(np.float32) for n in names]
    biases = [rng.normal(0, 0.5, (int(row_splits[names[i]][-1]), 1)).astype(np.float32) for i in model.bias_features]
    segments = [segments_of(row_splits[n]) for n in names]
    return params, embeddings, biases, segments


def summed_loss(model: DenseModel, inputs: Inputs, labels: np.ndarray) -> float:
    """Sigmoid cross-entropy summed over the batch, from the model's forward logits."""
    params, embeddings, biases, segments = inputs
    x = model.logits(params, embeddings, biases, segments, len(labels)).astype(np.float64)
    y = labels.astype(np.float64)
    return float(np.sum(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))


def finite_difference(model: DenseModel, inputs: Inputs, labels: np.ndarray, array: np.ndarray) -> np.ndarray:
    """d(summed loss)/d(array) by central differences; `array` is one of the inputs, perturbed in place."""
    grad = np.zeros(array.shape, np.float64)
    for index in np.ndindex(*array.shape):
        original = array[index]
        array[index] = original + EPS
        up = summed_loss(model, inputs, labels)
        array[index] = original - EPS
        down = summed_loss(model, inputs, labels)
        array[index] = original
        grad[index] = (up - down) / (2 * EPS)
    return grad


@pytest.fixture(scope="module")
def models() -> dict[str, DenseModel]:
    """One model per kind: building one traces its graphs (~0.5 s)."""
    return {kind: DenseModel(tiny_config(kind)) for kind in ("deepfm", "mlp")}


@pytest.fixture(params=["deepfm", "mlp"])
def model(request: Any, models: dict[str, DenseModel]) -> DenseModel:
    return models[request.param]


def test_parameter_shapes(models: dict[str, DenseModel]) -> None:
    model = models["deepfm"]

    assert model.parameter_shapes == {
        "global_bias": (1,),
        "mlp/kernel_0": (9, 4),
        "mlp/bias_0": (4,),
        "mlp/kernel_out": (4, 1),
        "mlp/bias_out": (1,),
    }
    assert model.bias_features == [0, 2]


def test_dense_gradients_are_of_the_mean_loss(model: DenseModel) -> None:
    inputs = random_inputs(model, ROW_SPLITS)
    params = inputs[0]

    result = model.train_step(*inputs, LABELS)

    assert sorted(result.dense_grads) == sorted(model.parameter_shapes)
    for name, value in params.items():
        expected = finite_difference(model, inputs, LABELS, value) / len(LABELS)
        assert result.dense_grads[name].shape == value.shape
        np.testing.assert_allclose(result.dense_grads[name], expected, rtol=1e-2, atol=5e-4, err_msg=name)


def test_embedding_and_bias_gradients_are_of_the_summed_loss_per_occurrence(model: DenseModel) -> None:
    inputs = random_inputs(model, ROW_SPLITS)
    _, embeddings, biases, _ = inputs

    result = model.train_step(*inputs, LABELS)

    assert [g.shape for g in result.embedding_grads] == [(4, 3), (4, 3), (6, 3)]
    assert [g.shape for g in result.bias_grads] == [(4, 1), (6, 1)]
    for i, table in enumerate(embeddings):
        expected = finite_difference(model, inputs, LABELS, table)
        np.testing.assert_allclose(result.embedding_grads[i], expected, rtol=1e-2, atol=5e-4, err_msg=f"feature {i}")
    for i, table in enumerate(biases):
        expected = finite_difference(model, inputs, LABELS, table)
        np.testing.assert_allclose(result.bias_grads[i], expected, rtol=1e-2, atol=5e-4, err_msg=f"bias {i}")


def test_occurrences_of_one_example_share_its_pooled_gradient(model: DenseModel) -> None:
    # Mean pooling: each of the k ids of an example gets 1/k of the pooled gradient, so
    # occurrences of the same example get identical gradients.
    inputs = random_inputs(model, ROW_SPLITS)

    genres = model.train_step(*inputs, LABELS).embedding_grads[2]

    np.testing.assert_allclose(genres[0], genres[1], rtol=1e-6)
    np.testing.assert_allclose(genres[2], genres[3], rtol=1e-6)
    np.testing.assert_allclose(genres[2], genres[4], rtol=1e-6)
    assert not np.allclose(genres[0], genres[2])


def test_loss_and_logits_of_a_step_match_the_forward_pass(model: DenseModel) -> None:
    inputs = random_inputs(model, ROW_SPLITS, seed=5)

    result = model.train_step(*inputs, LABELS)
    forward = model.logits(*inputs, len(LABELS))

    assert result.logits.dtype == np.float32 and result.logits.shape == (4,)
    np.testing.assert_allclose(result.logits, forward, rtol=1e-6, atol=1e-6)
    assert result.loss == pytest.approx(summed_loss(model, inputs, LABELS) / len(LABELS), rel=1e-5)


def test_an_example_without_ids_pools_that_feature_to_zero(model: DenseModel) -> None:
    # Example 1 has no genres: its logit must equal the logit it gets from one genre
    # occurrence whose embedding and bias are zero (mean of one zero row = zero).
    params, embeddings, biases, segments = random_inputs(model, ROW_SPLITS)
    with_zero = (
        params,
        [embeddings[0], embeddings[1], np.insert(embeddings[2], 2, 0.0, axis=0)],
        [biases[0], np.insert(biases[1], 2, 0.0, axis=0)],
        [segments[0], segments[1], np.array([0, 0, 1, 2, 2, 2, 3], np.int32)],
    )

    empty = model.logits(params, embeddings, biases, segments, 4)
    zero = model.logits(*with_zero, 4)

    assert np.all(np.isfinite(empty))
    assert empty[1] == pytest.approx(zero[1], abs=1e-6)


def test_a_feature_with_no_ids_in_the_whole_batch(model: DenseModel) -> None:
    splits = {**ROW_SPLITS, "genres": np.zeros(5, np.int64)}
    inputs = random_inputs(model, splits)

    result = model.train_step(*inputs, LABELS)

    assert [g.shape for g in result.embedding_grads] == [(4, 3), (4, 3), (0, 3)]
    assert [g.shape for g in result.bias_grads] == [(4, 1), (0, 1)]
    assert np.all(np.isfinite(result.logits)) and np.isfinite(result.loss)
    expected = finite_difference(model, inputs, LABELS, inputs[1][0])
    np.testing.assert_allclose(result.embedding_grads[0], expected, rtol=1e-2, atol=5e-4)


def test_with_a_zero_tower_deepfm_adds_exactly_the_fm_term_to_mlp(models: dict[str, DenseModel]) -> None:
    # Kernels at zero: the MLP contributes only its output bias, so mlp's logit is the
    # global bias + output bias + mean bias terms, and deepfm's adds the FM interactions.
    deepfm, mlp = models["deepfm"], models["mlp"]
    params, embeddings, biases, segments = random_inputs(deepfm, ROW_SPLITS)
    params = {n: (np.zeros_like(v) if "kernel" in n else v) for n, v in params.items()}
    pooled = np.stack(
        [
            np.stack([e[s == i].mean(axis=0) if np.any(s == i) else np.zeros(3) for i in range(4)])
            for e, s in zip(embeddings, segments)
        ],
        axis=1,
    )  # [batch, features, dim]
    mean_bias = sum(
        np.array([b[s == i].mean() if np.any(s == i) else 0.0 for i in range(4)])
        for b, s in zip(biases, [segments[0], segments[2]])
    )
    fm = 0.5 * np.sum(pooled.sum(axis=1) ** 2 - (pooled**2).sum(axis=1), axis=1)

    mlp_logits = mlp.logits(params, embeddings, biases, segments, 4)
    deepfm_logits = deepfm.logits(params, embeddings, biases, segments, 4)

    np.testing.assert_allclose(mlp_logits, params["global_bias"][0] + params["mlp/bias_out"][0] + mean_bias, atol=1e-5)
    np.testing.assert_allclose(deepfm_logits - mlp_logits, fm, atol=1e-5)


def test_relu_tower_gradients_point_downhill() -> None:
    # The shipped activation: a small step against the gradient lowers the loss.
    model = DenseModel(tiny_config(activation="relu"))
    params, embeddings, biases, segments = random_inputs(model, ROW_SPLITS)
    result = model.train_step(params, embeddings, biases, segments, LABELS)
    step = 0.05

    moved = (
        {n: v - step * result.dense_grads[n] * len(LABELS) for n, v in params.items()},
        [e - step * g for e, g in zip(embeddings, result.embedding_grads)],
        [b - step * g for b, g in zip(biases, result.bias_grads)],
        segments,
    )

    assert summed_loss(model, moved, LABELS) < result.loss * len(LABELS) - 1e-3


def test_initial_parameters_are_deterministic_in_the_seed(models: dict[str, DenseModel]) -> None:
    model = models["deepfm"]

    a, b, c = model.initial_parameters(7), model.initial_parameters(7), model.initial_parameters(8)

    assert list(a) == list(model.parameter_names)
    for name, shape in model.parameter_shapes.items():
        assert a[name].dtype == np.float32 and a[name].shape == shape
        np.testing.assert_array_equal(a[name], b[name])
        if "kernel" in name:
            limit = np.sqrt(6.0 / sum(shape))
            assert np.all(np.abs(a[name]) <= limit) and np.any(a[name] != 0)
            assert not np.array_equal(a[name], c[name])
        else:
            np.testing.assert_array_equal(a[name], np.zeros(shape, np.float32))
