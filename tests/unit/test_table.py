"""One table: admission, initializers, optimizers, expiry, export/import, threads."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monolith.embedding.config import AdmissionConfig, InitializerConfig, OptimizerConfig, TableConfig
from monolith.embedding.table import EmbeddingTable, RowBatch

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def make_table(
    name: str = "t",
    dim: int = 4,
    init: tuple[str, float] = ("uniform", 0.05),
    optimizer: OptimizerConfig | None = None,
    admission: tuple[str, int] = ("none", 1),
    expire_after: float | None = None,
    seed: int = 0,
    initial_capacity: int = 1024,
) -> EmbeddingTable:
    config = TableConfig(
        name=name,
        dim=dim,
        initializer=InitializerConfig(kind=init[0], scale=init[1]),
        optimizer=optimizer or OptimizerConfig(kind="sgd", learning_rate=0.1),
        admission=AdmissionConfig(filter=admission[0], threshold=admission[1]),
        expire_after=expire_after,
        seed=seed,
    )
    return EmbeddingTable(config, initial_capacity=initial_capacity)


def ids_of(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def full_export(table: EmbeddingTable, since: int = 0, include_state: bool = True, max_rows: int = 97) -> RowBatch:
    """Every exported row, sorted by id."""
    width = table.width if include_state else table.dim
    batches = list(table.export(since, include_state, max_rows))
    for batch in batches:
        assert 0 < batch.ids.shape[0] <= max_rows
        assert batch.values.shape == (batch.ids.shape[0], width)
        assert batch.values.dtype == np.float32 and batch.update_times.dtype == np.uint32
    if not batches:
        return RowBatch(np.zeros(0, np.int64), np.zeros((0, width), np.float32), np.zeros(0, np.uint32))
    ids = np.concatenate([b.ids for b in batches])
    order = np.argsort(ids, kind="stable")
    assert np.unique(ids).shape[0] == ids.shape[0], "an export listed a row twice"
    return RowBatch(
        ids[order],
        np.concatenate([b.values for b in batches])[order],
        np.concatenate([b.update_times for b in batches])[order],
    )


def assert_same_rows(a: RowBatch, b: RowBatch) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.update_times, b.update_times)


def state_of(table: EmbeddingTable, key: int) -> np.ndarray:
    """The full row (embedding + optimizer state) of one id, as float64."""
    rows = full_export(table)
    position = np.flatnonzero(rows.ids == key)
    assert position.shape[0] == 1, f"id {key} has no row"
    return rows.values[position[0]].astype(np.float64)


# ------------------------------------------------------------------ admission


def test_counting_filter_admits_at_the_threshold_th_occurrence() -> None:
    table = make_table(admission=("counting", 3))
    x = ids_of(42)

    for version in (1, 2):
        np.testing.assert_array_equal(table.lookup_train(x, None, 10.0, version), np.zeros((1, 4)))
        assert not table.contains(x)[0]
        assert len(table) == 0
        assert table.stats().pending_ids == 1
    admitted = table.lookup_train(x, None, 10.0, 3)

    assert table.contains(x)[0]
    assert np.abs(admitted).sum() > 0
    np.testing.assert_array_equal(table.lookup(x), admitted)
    stats = table.stats()
    assert (stats.rows, stats.admissions, stats.pending_ids) == (1, 1, 0)


@pytest.mark.parametrize(
    ("counts", "admitted_at"),
    [
        ([2, 1], 1),  # 2 + 1 = 3
        ([1, 2], 1),
        ([3], 0),
        ([7], 0),
        ([1, 1, 1], 2),
    ],
)
def test_counting_filter_adds_counts_exactly(counts: list[int], admitted_at: int) -> None:
    table = make_table(admission=("counting", 3))
    x = ids_of(-7)

    for call, count in enumerate(counts):
        out = table.lookup_train(x, np.array([count], np.int32), 10.0, call + 1)
        assert table.contains(x)[0] == (call >= admitted_at)
        assert (np.abs(out).sum() > 0) == (call >= admitted_at)


def test_counting_filter_does_not_round_up() -> None:
    table = make_table(admission=("counting", 5))
    x = ids_of(3)

    table.lookup_train(x, np.array([2], np.int32), 1.0, 1)
    table.lookup_train(x, np.array([2], np.int32), 1.0, 2)
    assert not table.contains(x)[0]
    table.lookup_train(x, np.array([1], np.int32), 1.0, 3)
    assert table.contains(x)[0]


def test_counting_filter_counts_each_position_of_a_batch() -> None:
    table = make_table(admission=("counting", 3))
    ids = ids_of(9, 8, 9, 9, 8)

    out = table.lookup_train(ids, None, 1.0, 1)

    # Id 9's first two occurrences read zeros, its third creates the row.
    assert table.contains(ids_of(9))[0] and not table.contains(ids_of(8))[0]
    np.testing.assert_array_equal(out[[0, 1, 2, 4]], np.zeros((4, 4)))
    np.testing.assert_array_equal(out[3], table.lookup(ids_of(9))[0])
    assert table.stats().pending_ids == 1


def test_counting_filter_tracks_many_pending_ids() -> None:
    table = make_table(admission=("counting", 2), initial_capacity=8)
    ids = np.arange(5000, dtype=np.int64) * 7919

    table.lookup_train(ids, None, 1.0, 1)
    assert len(table) == 0
    assert table.stats().pending_ids == 5000
    table.lookup_train(ids[::2], None, 1.0, 2)

    assert len(table) == 2500
    assert table.stats().pending_ids == 2500
    assert table.contains(ids[::2]).all() and not table.contains(ids[1::2]).any()


def test_gradients_of_ids_without_a_row_are_dropped_and_counted() -> None:
    table = make_table(admission=("counting", 2), optimizer=OptimizerConfig(kind="sgd", learning_rate=1.0))
    x, y = ids_of(1), ids_of(2)
    table.lookup_train(np.concatenate([x, y]), np.array([1, 2], np.int32), 5.0, 1)
    initial_y = table.lookup(y)

    updated, dropped = table.apply_gradients(ids_of(1, 2, 1), np.ones((3, 4), np.float32), 6.0, 2)

    assert (updated, dropped) == (1, 1)
    assert table.stats().filtered_gradients == 1
    np.testing.assert_allclose(table.lookup(y), initial_y - 1.0, rtol=1e-6)
    # Once admitted, x starts from its initial vector: the dropped gradient left no trace.
    admitted = table.lookup_train(x, None, 7.0, 3)
    reference = make_table(optimizer=OptimizerConfig(kind="sgd", learning_rate=1.0))
    np.testing.assert_array_equal(admitted, reference.lookup_train(x, None, 7.0, 1))


def test_pending_counts_are_forgotten_by_expiry() -> None:
    table = make_table(admission=("counting", 2), expire_after=100)
    old, recent = ids_of(1), ids_of(2)
    table.lookup_train(old, None, 1000.0, 1)
    table.lookup_train(recent, None, 1090.0, 2)

    table.expire(3, now=1150.0)

    assert table.stats().pending_ids == 1
    table.lookup_train(np.concatenate([old, recent]), None, 1150.0, 4)
    assert not table.contains(old)[0]  # counting starts over
    assert table.contains(recent)[0]


@pytest.mark.parametrize("threshold", [2, 3, 10])
def test_probabilistic_filter_admits_with_the_paper_probability(threshold: int) -> None:
    table = make_table(admission=("probabilistic", threshold))
    ids = np.arange(20_000, dtype=np.int64) * 104729 - 10**9
    p = 1.0 - 0.05 ** (1.0 / threshold)

    out = table.lookup_train(ids, None, 1.0, 1)

    admitted = table.contains(ids)
    assert abs(admitted.mean() - p) < 0.02
    assert len(table) == admitted.sum() == table.stats().admissions
    np.testing.assert_array_equal(np.abs(out).sum(axis=1) > 0, admitted)
    assert table.stats().pending_ids == 0  # the filter keeps no per-id state


def test_probabilistic_filter_admits_95_percent_by_the_threshold_th_occurrence() -> None:
    threshold = 4
    table = make_table(admission=("probabilistic", threshold))
    ids = np.arange(10_000, dtype=np.int64)

    for version in range(1, threshold + 1):
        table.lookup_train(ids, None, 1.0, version)

    assert abs(table.contains(ids).mean() - 0.95) < 0.015


def test_probabilistic_filter_with_counts() -> None:
    table = make_table(admission=("probabilistic", 5))
    ids = np.arange(10_000, dtype=np.int64)

    table.lookup_train(ids[:5000], np.full(5000, 5, np.int32), 1.0, 1)
    table.lookup_train(ids[5000:], np.full(5000, 200, np.int32), 1.0, 2)

    assert abs(table.contains(ids[:5000]).mean() - 0.95) < 0.02
    assert table.contains(ids[5000:]).all()


@pytest.mark.parametrize("kind", ["counting", "probabilistic", "none"])
def test_threshold_one_admits_everything(kind: str) -> None:
    table = make_table(admission=(kind, 1))
    ids = np.arange(-5000, 5000, dtype=np.int64)

    table.lookup_train(ids, None, 1.0, 1)

    assert table.contains(ids).all()
    assert table.stats().admissions == 10_000


# ---------------------------------------------------------------- initializers


def test_a_recreated_row_starts_identical() -> None:
    table = make_table(optimizer=OptimizerConfig(kind="adagrad"))
    ids = ids_of(5, INT64_MIN, INT64_MAX)
    initial = table.lookup_train(ids, None, 1.0, 1)
    table.apply_gradients(ids, np.ones((3, 4), np.float32), 2.0, 2)
    assert not np.array_equal(table.lookup(ids), initial)

    table.delete(ids, 3)
    recreated = table.lookup_train(ids, None, 4.0, 4)

    np.testing.assert_array_equal(recreated, initial)
    np.testing.assert_array_equal(state_of(table, 5)[4:], np.full(4, 0.1, np.float32))


def test_initial_vectors_depend_on_table_name_and_seed_only() -> None:
    ids = np.arange(-500, 500, dtype=np.int64) * 31337
    base = make_table(name="user", seed=3).lookup_train(ids, None, 1.0, 1)

    same = make_table(name="user", seed=3, initial_capacity=8, optimizer=OptimizerConfig(kind="adam"))
    np.testing.assert_array_equal(same.lookup_train(ids[::-1], None, 99.0, 7)[::-1], base)
    for other in (make_table(name="user", seed=4), make_table(name="item", seed=3)):
        values = other.lookup_train(ids, None, 1.0, 1)
        assert not np.isclose(values, base).all(axis=1).any()


def test_rows_of_different_ids_differ() -> None:
    values = make_table(dim=8).lookup_train(np.arange(2000, dtype=np.int64), None, 1.0, 1)

    assert np.unique(values, axis=0).shape[0] == 2000


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.5])
def test_uniform_initializer(scale: float) -> None:
    values = make_table(dim=8, init=("uniform", scale)).lookup_train(np.arange(20_000), None, 1.0, 1)

    assert np.abs(values).max() <= scale
    assert values.min() < -0.99 * scale and values.max() > 0.99 * scale
    assert abs(values.mean()) < 0.01 * scale
    assert abs(values.std() - scale / np.sqrt(3)) < 0.01 * scale
    # The embedding's coordinates are independent streams, not copies of one another.
    assert abs(np.corrcoef(values[:, 0], values[:, 1])[0, 1]) < 0.03


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_normal_initializer(scale: float) -> None:
    values = make_table(dim=8, init=("normal", scale)).lookup_train(np.arange(20_000), None, 1.0, 1)

    assert abs(values.mean()) < 0.01 * scale
    assert abs(values.std() - scale) < 0.02 * scale
    within_one = np.mean(np.abs(values) < scale)
    assert abs(within_one - 0.6827) < 0.01
    assert np.isfinite(values).all()


def test_zeros_initializer() -> None:
    table = make_table(init=("zeros", 0.5))

    values = table.lookup_train(np.arange(100), None, 1.0, 1)

    assert table.contains(np.arange(100)).all()
    np.testing.assert_array_equal(values, np.zeros((100, 4)))


# ------------------------------------------------------------------ optimizers


def reference_steps(kind: str, opt: OptimizerConfig, row: np.ndarray, grads: list[np.ndarray], dim: int,
                    squares: list[np.ndarray] | None = None) -> np.ndarray:  # fmt: skip
    """The textbook update of one full row (embedding + state), in float64.

    `squares[k]`, when given, is what step k adds to Adagrad's and FTRL's accumulators
    instead of its gradient's square.
    """
    row = row.astype(np.float64).copy()
    w = row[:dim]
    lr = opt.learning_rate
    for k, g in enumerate(grads):
        g = g.astype(np.float64)
        sq = g * g if squares is None else squares[k].astype(np.float64)
        if kind == "sgd":
            w -= lr * g
        elif kind == "adagrad":
            acc = row[dim : 2 * dim]
            acc += sq
            w -= lr * g / (np.sqrt(acc) + opt.epsilon)
        elif kind == "ftrl":
            z, n = row[dim : 2 * dim], row[2 * dim : 3 * dim]
            n_new = n + sq
            sigma = (np.sqrt(n_new) - np.sqrt(n)) / lr
            z += g - sigma * w
            n[:] = n_new
            w[:] = np.where(
                np.abs(z) <= opt.l1, 0.0, (np.sign(z) * opt.l1 - z) / ((opt.beta + np.sqrt(n_new)) / lr + opt.l2)
            )
        else:
            m, v = row[dim : 2 * dim], row[2 * dim : 3 * dim]
            row[3 * dim] += 1
            t = row[3 * dim]
            m[:] = opt.beta1 * m + (1 - opt.beta1) * g
            v[:] = opt.beta2 * v + (1 - opt.beta2) * g * g
            w -= lr * (m / (1 - opt.beta1**t)) / (np.sqrt(v / (1 - opt.beta2**t)) + opt.epsilon)
    return row


OPTIMIZERS = {
    "sgd": OptimizerConfig(kind="sgd", learning_rate=0.3),
    "adagrad": OptimizerConfig(kind="adagrad", learning_rate=0.2, initial_accumulator=0.1, epsilon=1e-3,
                               accumulate="occurrences"),
    "ftrl": OptimizerConfig(kind="ftrl", learning_rate=0.5, initial_accumulator=0.2, l1=0.05, l2=0.3, beta=0.7,
                            accumulate="occurrences"),
    "adam": OptimizerConfig(kind="adam", learning_rate=0.01, beta1=0.8, beta2=0.95, epsilon=1e-4),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("init", [("uniform", 0.5), ("zeros", 0.0)])
def test_optimizer_matches_its_textbook_update(kind: str, init: tuple[str, float]) -> None:
    opt = OPTIMIZERS[kind]
    dim = 5
    table = make_table(dim=dim, init=init, optimizer=opt)
    rng = np.random.default_rng(1)
    ids = ids_of(11, -12)
    table.lookup_train(ids, None, 1.0, 1)
    expected = {int(k): state_of(table, int(k)) for k in ids}
    grads = {int(k): [rng.normal(0, 0.7, dim).astype(np.float32) for _ in range(6)] for k in ids}

    for step in range(6):
        batch = np.stack([grads[int(k)][step] for k in ids])
        assert table.apply_gradients(ids, batch, 2.0 + step, 2 + step) == (2, 0)
        for k in ids:
            expected[int(k)] = reference_steps(kind, opt, expected[int(k)], [grads[int(k)][step]], dim)
            np.testing.assert_allclose(state_of(table, int(k)), expected[int(k)], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(table.lookup(ids), np.stack([expected[int(k)][:dim] for k in ids]), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    ("kind", "state"),
    [("sgd", []), ("adagrad", [0.1] * 3), ("adam", [0.0] * 7)],
)
def test_initial_optimizer_state(kind: str, state: list[float]) -> None:
    table = make_table(dim=3, optimizer=OptimizerConfig(kind=kind, initial_accumulator=0.1))
    table.lookup_train(ids_of(1), None, 1.0, 1)

    np.testing.assert_allclose(state_of(table, 1)[3:], np.array(state, np.float32))


def test_initial_ftrl_state_reproduces_the_initial_weight() -> None:
    opt = OptimizerConfig(kind="ftrl", learning_rate=0.3, initial_accumulator=0.5, l1=0.02, l2=0.4, beta=1.5)
    table = make_table(dim=6, init=("uniform", 1.0), optimizer=opt)
    table.lookup_train(np.arange(50), None, 1.0, 1)

    rows = full_export(table).values.astype(np.float64)
    w, z, n = rows[:, :6], rows[:, 6:12], rows[:, 12:]
    np.testing.assert_array_equal(n, np.full_like(n, 0.5, dtype=np.float32))
    denominator = (opt.beta + np.sqrt(n)) / opt.learning_rate + opt.l2
    closed_form = np.where(np.abs(z) <= opt.l1, 0.0, (np.sign(z) * opt.l1 - z) / denominator)
    np.testing.assert_allclose(closed_form, w, rtol=1e-5, atol=1e-6)


def test_ftrl_l1_zeroes_small_weights() -> None:
    opt = OptimizerConfig(kind="ftrl", learning_rate=0.5, initial_accumulator=0.1, l1=1.0, l2=0.0, beta=1.0)
    table = make_table(dim=2, init=("zeros", 0.0), optimizer=opt)
    x = ids_of(1)
    table.lookup_train(x, None, 1.0, 1)
    initial = state_of(table, 1)

    table.apply_gradients(x, np.array([[0.3, 3.0]], np.float32), 2.0, 2)

    w = table.lookup(x)[0]
    assert w[0] == 0.0  # |z| = 0.3 <= l1
    assert w[1] < 0.0  # |z| = 3 > l1: the weight moves against the gradient
    expected = reference_steps("ftrl", opt, initial, [np.array([0.3, 3.0])], 2)
    np.testing.assert_allclose(w, expected[:2], rtol=1e-5)


def test_adam_is_lazy_per_row() -> None:
    opt = OPTIMIZERS["adam"]
    table = make_table(dim=3, init=("zeros", 0.0), optimizer=opt)
    busy, idle = ids_of(1), ids_of(2)
    table.lookup_train(ids_of(1, 2), None, 1.0, 1)
    g = np.array([[0.5, -2.0, 0.001]], np.float32)

    for step in range(4):
        table.apply_gradients(busy, g, 2.0, 2 + step)
    table.apply_gradients(idle, g, 2.0, 6)

    assert state_of(table, 1)[-1] == 4
    assert state_of(table, 2)[-1] == 1
    # One bias-corrected step moves each weight by about lr against its gradient's sign.
    expected = -opt.learning_rate * g[0] / (np.abs(g[0]) + opt.epsilon)
    np.testing.assert_allclose(table.lookup(idle)[0], expected, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_duplicate_ids_take_one_step_with_the_summed_gradient_and_their_squares(kind: str) -> None:
    opt = OPTIMIZERS[kind]
    summed = make_table(dim=3, optimizer=opt, seed=5)
    separate = make_table(dim=3, optimizer=opt, seed=5)
    ids = ids_of(4, 9, 4, 4)
    grads = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5], [2.0, -3.0, 0.25], [-0.5, 1.0, 1.0]], np.float32)
    for table in (summed, separate):
        table.lookup_train(ids_of(4, 9), None, 1.0, 1)
    initial = state_of(summed, 4)
    occurrences = grads[[0, 2, 3]]  # id 4's three rows: one per occurrence

    assert summed.apply_gradients(ids, grads, 2.0, 2) == (2, 0)
    separate.apply_gradients(ids_of(4, 9), np.stack([occurrences.sum(axis=0), grads[1]]), 2.0, 2,
                             squares=np.stack([(occurrences**2).sum(axis=0), grads[1] ** 2]))  # fmt: skip

    assert_same_rows(full_export(summed), full_export(separate))
    # One step with the summed gradient; Adagrad and FTRL (accumulating occurrences here, not
    # the default sums) accumulate the occurrences' squares.
    one_step = reference_steps(kind, opt, initial, [occurrences.sum(axis=0)], 3, [(occurrences**2).sum(axis=0)])
    np.testing.assert_allclose(state_of(summed, 4), one_step, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["adagrad", "ftrl"])
def test_an_optimizer_that_accumulates_sums_ignores_the_squares(kind: str) -> None:
    opt = OPTIMIZERS[kind].model_copy(update={"accumulate": "sums"})
    given = make_table(dim=3, optimizer=opt, seed=5)
    summed = make_table(dim=3, optimizer=opt, seed=5)
    for table in (given, summed):
        table.lookup_train(ids_of(4), None, 1.0, 1)
    initial = state_of(given, 4)
    g = np.array([0.3, -0.2, 0.1], np.float32)

    given.apply_gradients(ids_of(4), (3 * g)[None], 2.0, 2, squares=(3 * g * g)[None])
    summed.apply_gradients(ids_of(4, 4, 4), np.tile(g, (3, 1)), 2.0, 2)

    # Both take one step on the summed gradient and accumulate its square.
    one_step = reference_steps(kind, opt, initial, [3 * g], 3)
    np.testing.assert_allclose(state_of(given, 4), one_step, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(state_of(summed, 4), one_step, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["adagrad", "ftrl"])
def test_per_occurrence_squares_accumulate_as_sequential_steps_do(kind: str) -> None:
    """An id a large batch holds n times: its accumulator grows as n steps would grow it, so
    the one summed step moves it about as far as they would (the square of the sum would
    grow the accumulator n times as much and slow the id by about sqrt(n))."""
    opt, n, dim = OPTIMIZERS[kind], 64, 3
    g = np.array([0.3, -0.2, 0.1], np.float32)
    tables = {name: make_table(dim=dim, optimizer=opt, seed=5) for name in ("sequential", "occurrences", "sum")}
    for table in tables.values():
        table.lookup_train(ids_of(4), None, 1.0, 1)
    initial = state_of(tables["sequential"], 4)

    for step in range(n):
        tables["sequential"].apply_gradients(ids_of(4), g[None], 2.0, 2 + step)
    tables["occurrences"].apply_gradients(ids_of(*[4] * n), np.tile(g, (n, 1)), 2.0, 2)
    tables["sum"].apply_gradients(ids_of(4), (n * g)[None], 2.0, 2)  # the square of the sum

    sequential, occurrences, square_of_sum = (state_of(tables[k], 4) for k in ("sequential", "occurrences", "sum"))
    accumulator = slice(dim, 2 * dim) if kind == "adagrad" else slice(2 * dim, 3 * dim)
    np.testing.assert_allclose(occurrences[accumulator], sequential[accumulator], rtol=1e-5)
    moved = {name: np.abs(state[:dim] - initial[:dim]).sum() for name, state in
             (("sequential", sequential), ("occurrences", occurrences), ("sum", square_of_sum))}  # fmt: skip
    assert abs(moved["occurrences"] - moved["sequential"]) < abs(moved["sum"] - moved["sequential"]) / 2, moved


def test_flat_gradients_are_reshaped_per_row() -> None:
    table = make_table(dim=2, init=("zeros", 0.0), optimizer=OptimizerConfig(kind="sgd", learning_rate=1.0))
    table.lookup_train(ids_of(1), None, 1.0, 1)

    table.apply_gradients(ids_of(1), np.array([1, 2], np.float64), 1.0, 2)

    np.testing.assert_array_equal(table.lookup(ids_of(1)), [[-1.0, -2.0]])


# --------------------------------------------------------------------- expiry


def test_rows_not_updated_for_expire_after_are_evicted() -> None:
    table = make_table(expire_after=100, optimizer=OptimizerConfig(kind="sgd"))
    a, b, c = np.arange(0, 20), np.arange(20, 30), np.arange(30, 35)
    table.lookup_train(a, None, 1000.0, 1)
    table.lookup_train(b, None, 1050.0, 2)
    table.apply_gradients(a[:5], np.ones((5, 4), np.float32), 1080.0, 3)

    assert table.expire(4) == 0  # reference 1080: nothing is 100 s old yet
    table.lookup_train(c, None, 1101.0, 5)
    # Training lookups of existing rows are not updates: they do not keep a row alive.
    table.lookup_train(a[5:], None, 1101.0, 6)
    evicted = table.expire(7)

    assert evicted == 15
    assert not table.contains(a[5:]).any()
    assert table.contains(np.concatenate([a[:5], b, c])).all()
    stats = table.stats()
    assert (stats.evictions, stats.rows) == (15, 20)
    np.testing.assert_array_equal(np.sort(table.deleted_since(6)), a[5:])
    np.testing.assert_array_equal(np.sort(table.deleted_since(0)), a[5:])
    assert table.deleted_since(7).shape[0] == 0


def test_expiry_age_boundary() -> None:
    table = make_table(expire_after=100)
    table.lookup_train(ids_of(1), None, 899.0, 1)
    table.lookup_train(ids_of(2), None, 901.0, 2)

    assert table.expire(3, now=1000.0) == 1

    assert not table.contains(ids_of(1))[0] and table.contains(ids_of(2))[0]


def test_expire_with_an_explicit_reference_time() -> None:
    table = make_table(expire_after=60)
    table.lookup_train(np.arange(10), None, 1000.0, 1)
    table.lookup_train(np.arange(10, 20), None, 2000.0, 2)

    assert table.expire(3, now=1030.0) == 0
    assert table.expire(4, now=2030.0) == 10
    assert table.contains(np.arange(10, 20)).all()
    assert table.expire(5, now=10**6) == 10
    assert len(table) == 0
    assert table.stats().evictions == 20
    np.testing.assert_array_equal(np.sort(table.deleted_since(3)), np.arange(20))
    np.testing.assert_array_equal(np.sort(table.deleted_since(4)), np.arange(10, 20))


def test_an_evicted_id_comes_back_fresh() -> None:
    table = make_table(expire_after=10, optimizer=OptimizerConfig(kind="sgd", learning_rate=1.0))
    x = ids_of(77)
    initial = table.lookup_train(x, None, 100.0, 1)
    table.apply_gradients(x, np.ones((1, 4), np.float32), 100.0, 2)

    table.expire(3, now=200.0)
    again = table.lookup_train(x, None, 200.0, 4)

    np.testing.assert_array_equal(again, initial)


def test_no_expiry_without_expire_after() -> None:
    table = make_table(expire_after=None)
    table.lookup_train(np.arange(100), None, 1.0, 1)

    assert table.expire(2) == 0
    assert table.expire(3, now=2.0**40) == 0
    assert len(table) == 100
    assert table.stats().evictions == 0
    assert table.deleted_since(0).shape[0] == 0


def test_expiry_frees_rows_for_reuse() -> None:
    table = make_table(expire_after=10, initial_capacity=8)
    table.lookup_train(np.arange(5000), None, 100.0, 1)
    capacity = table.capacity

    table.expire(2, now=1000.0)
    table.lookup_train(np.arange(5000, 10_000), None, 1000.0, 3)

    assert table.capacity == capacity
    assert len(table) == 5000


# -------------------------------------------------------------- export/import


def trained_table(opt: OptimizerConfig, ids: np.ndarray, rng: np.random.Generator, **kwargs: Any) -> EmbeddingTable:
    table = make_table(dim=3, optimizer=opt, **kwargs)
    table.lookup_train(ids, None, 1000.0, 1)
    for step in range(3):
        chosen = ids[rng.random(ids.shape[0]) < 0.5]
        grads = rng.normal(0, 1, (chosen.shape[0], 3)).astype(np.float32)
        table.apply_gradients(chosen, grads, 1001.0 + step, 2 + step)
    return table


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(st.integers(INT64_MIN, INT64_MAX), unique=True, max_size=200),
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    max_rows=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_export_then_import_is_identity(ids: list[int], kind: str, max_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids_array = np.array(ids, dtype=np.int64)
    source = trained_table(OPTIMIZERS[kind], ids_array, rng)
    copy = make_table(dim=3, optimizer=OPTIMIZERS[kind], initial_capacity=8)

    for batch in source.export(0, True, max_rows):
        copy.upsert(batch, 1)

    assert len(copy) == len(source) == len(ids)
    np.testing.assert_array_equal(copy.lookup(ids_array), source.lookup(ids_array))
    assert_same_rows(full_export(copy), full_export(source))
    # The copy trains on exactly as the source does.
    grads = rng.normal(0, 1, (len(ids), 3)).astype(np.float32)
    source.apply_gradients(ids_array, grads, 2000.0, 9)
    copy.apply_gradients(ids_array, grads, 2000.0, 9)
    assert_same_rows(full_export(copy), full_export(source))


def test_embedding_only_import_gives_new_rows_fresh_state_and_keeps_existing_state() -> None:
    opt = OPTIMIZERS["adagrad"]
    source = trained_table(opt, np.arange(10), np.random.default_rng(0))
    copy = make_table(dim=3, optimizer=opt)
    copy.lookup_train(np.arange(5), None, 1.0, 1)
    copy.apply_gradients(np.arange(5), np.full((5, 3), 2.0, np.float32), 1.0, 2)
    kept_state = full_export(copy).values[:, 3:]

    for batch in source.export(0, False, 4):
        copy.upsert(batch, 3)

    rows = full_export(copy)
    np.testing.assert_array_equal(rows.values[:, :3], full_export(source).values[:, :3])
    np.testing.assert_array_equal(rows.values[:5, 3:], kept_state)
    np.testing.assert_array_equal(rows.values[5:, 3:], np.full((5, 3), 0.1, np.float32))
    np.testing.assert_array_equal(rows.update_times, full_export(source).update_times)


def test_upsert_rejects_rows_of_the_wrong_width() -> None:
    table = make_table(dim=3, optimizer=OPTIMIZERS["adagrad"])
    bad = RowBatch(ids_of(1), np.zeros((1, 4), np.float32), np.zeros(1, np.uint32))

    with pytest.raises(ValueError, match="do not fit table 't'"):
        table.upsert(bad, 1)
    with pytest.raises(ValueError):
        table.upsert(RowBatch(ids_of(1, 2), np.zeros((1, 3), np.float32), np.zeros(2, np.uint32)), 1)
    assert len(table) == 0


def test_export_since_lists_only_later_changes() -> None:
    table = make_table()
    table.lookup_train(np.arange(10), None, 1.0, 1)
    table.lookup_train(np.arange(10, 15), None, 1.0, 2)
    table.apply_gradients(ids_of(3, 12), np.ones((2, 4), np.float32), 1.0, 3)
    table.lookup(np.arange(15))  # reads are not changes
    table.lookup_train(np.arange(15), None, 1.0, 4)  # nor are training reads of existing rows

    assert full_export(table, since=0).ids.tolist() == list(range(15))
    assert full_export(table, since=1).ids.tolist() == [3, 10, 11, 12, 13, 14]
    assert full_export(table, since=2).ids.tolist() == [3, 12]
    assert full_export(table, since=3).ids.shape[0] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_export_reproduces_the_source(seed: int) -> None:
    rng = np.random.default_rng(seed)
    opt = OPTIMIZERS["ftrl"]
    source = make_table(dim=3, optimizer=opt, expire_after=100, initial_capacity=8)
    a, b, c = np.arange(0, 200), np.arange(200, 300), np.arange(300, 350)
    source.lookup_train(a, None, 1000.0, 1)
    source.apply_gradients(a, rng.normal(0, 1, (200, 3)).astype(np.float32), 1000.0, 2)
    source.lookup_train(b, None, 1150.0, 3)
    since = 3
    copy = make_table(dim=3, optimizer=opt, expire_after=100)
    for batch in source.export(0, True, 64):
        copy.upsert(batch, 1)
    assert_same_rows(full_export(copy), full_export(source))

    source.apply_gradients(a[:50], rng.normal(0, 1, (50, 3)).astype(np.float32), 1160.0, 4)  # updated
    source.lookup_train(c, None, 1160.0, 5)  # created
    assert source.expire(6) == 150  # a[50:] evicted (last update 1000 < 1160 - 100)
    assert source.delete(np.concatenate([b[:20], c[:5]]), 7) == 25  # deleted
    source.lookup_train(a[50:60], None, 1170.0, 8)  # evicted, then created again
    source.lookup(np.arange(400))  # reads change nothing

    changed = full_export(source, since=since)
    deleted = source.deleted_since(since)

    np.testing.assert_array_equal(changed.ids, np.sort(np.concatenate([a[:60], c[5:]])))
    np.testing.assert_array_equal(np.sort(deleted), np.sort(np.concatenate([a[50:], b[:20], c[:5]])))
    copy.delete(deleted, 2)
    for batch in source.export(since, True, 64):
        copy.upsert(batch, 3)
    assert_same_rows(full_export(copy), full_export(source))
    np.testing.assert_array_equal(copy.lookup(np.arange(400)), source.lookup(np.arange(400)))
    assert len(copy) == len(source) == 50 + 10 + 80 + 45


def test_deleted_since_lists_deletions_by_version() -> None:
    table = make_table()
    table.lookup_train(np.arange(10), None, 1.0, 1)

    assert table.delete(ids_of(1, 2), 2) == 2
    assert table.delete(ids_of(3), 3) == 1
    assert table.delete(ids_of(3), 4) == 0  # already gone

    np.testing.assert_array_equal(np.sort(table.deleted_since(1)), [1, 2, 3, 3])
    np.testing.assert_array_equal(np.sort(table.deleted_since(2)), [3, 3])
    assert len(table) == 7


# ----------------------------------------------------------------- concurrency


def test_concurrent_lookups_never_see_torn_rows() -> None:
    # SGD with lr 1, zeros at creation and gradients of -1 in every element: each row only
    # ever holds k in every element, so a read that raced a write would show unequal elements.
    dim = 8
    sgd = OptimizerConfig(kind="sgd", learning_rate=1.0)
    table = make_table(dim=dim, init=("zeros", 0.0), optimizer=sgd, initial_capacity=8)
    hot = np.arange(64, dtype=np.int64)
    table.lookup_train(hot, None, 1.0, 1)
    steps = [0]
    created_upto = [0]
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0, 0]

    def writer() -> None:
        version = 2
        next_id = 10**6
        try:
            while not stop.is_set():
                table.apply_gradients(hot, -np.ones((64, dim), np.float32), 2.0, version)
                steps[0] += 1
                if next_id < 10**6 + 200_000:
                    table.lookup_train(np.arange(next_id, next_id + 2000), None, 2.0, version + 1)
                    next_id += 2000
                    created_upto[0] = next_id
                    table.delete(np.arange(next_id - 2000, next_id - 1900), version + 1)
                version += 2
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def reader() -> None:
        last = np.zeros(64, np.float32)
        try:
            while not stop.is_set():
                before = steps[0]
                out = table.lookup(hot)
                after = steps[0]
                assert (out == out[:, :1]).all(), "torn row"
                assert (out[:, 0] >= last).all(), "a row went back in time"
                assert (out[:, 0] >= before).all() and (out[:, 0] <= after + 1).all()
                assert (out[:, 0] == np.round(out[:, 0])).all()
                last = out[:, 0]
                upto = created_upto[0]
                if upto:
                    fresh = np.arange(upto - 1900, upto)
                    assert table.contains(fresh).all()
                    assert not table.lookup(fresh).any()
                reads[0] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def exporter() -> None:
        try:
            while not stop.is_set():
                for batch in table.export(0, False, 4096):
                    assert (batch.values == batch.values[:, :1]).all(), "torn row in export"
                reads[1] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (writer, reader, reader, exporter)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=30)

    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert reads[0] > 10 and reads[1] > 0 and steps[0] > 10
    assert table.capacity > 10_000  # the arena grew while readers ran
    np.testing.assert_array_equal(table.lookup(hot), np.full((64, dim), steps[0], np.float32))


# ------------------------------------------------ inconsistent batches (regressions)


def test_upsert_rejects_update_times_of_the_wrong_length() -> None:
    """upsert checks update_times against ids, not only the values' shape: the kernel would
    read times[i] past the end of a shorter array (numba does no bounds checks)."""
    table = make_table(dim=3)
    batch = RowBatch(np.arange(5, dtype=np.int64), np.ones((5, 3), np.float32), np.zeros(1, np.uint32))

    with pytest.raises(ValueError):
        table.upsert(batch, 1)
    assert len(table) == 0
