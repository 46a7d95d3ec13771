"""The dense-PS core: init/pull/push semantics, versions, validation, snapshots, threads."""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import pytest

from monolith.common.errors import FailedPrecondition, InvalidArgument, MonolithError
from monolith.model.config import DenseOptimizerConfig
from monolith.dense_ps.store import DenseSnapshot, DenseStore

SGD = DenseOptimizerConfig(kind="sgd", learning_rate=0.125)  # a power of two: float32 steps are exact


def initial() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([0.5, -0.5], np.float32)}


def ones() -> dict[str, np.ndarray]:
    return {"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}


def make_store(config: DenseOptimizerConfig = SGD, pushes: int = 0) -> DenseStore:
    store = DenseStore(config)
    store.init(initial())
    for _ in range(pushes):
        store.push(ones())
    return store


def assert_equal(got: dict[str, np.ndarray] | None, expected: dict[str, np.ndarray]) -> None:
    assert got is not None
    assert list(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def assert_same_snapshot(a: DenseSnapshot, b: DenseSnapshot) -> None:
    assert a.version == b.version
    for x, y in ((a.tensors, b.tensors), (a.optimizer_state, b.optimizer_state)):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --------------------------------------------------------------------------- init


def test_before_init_pull_push_and_snapshot_fail_with_not_initialized() -> None:
    store = DenseStore(SGD)

    for call in (lambda: store.pull(), lambda: store.push(ones()), store.snapshot):
        with pytest.raises(FailedPrecondition, match="not initialized"):
            call()

    assert store.stats().version == 0
    assert store.stats().rejected_pushes == 1


def test_first_init_adopts_a_copy_at_version_1() -> None:
    store = DenseStore(SGD)
    values = initial()

    version, held = store.init(values)
    values["w"][:] = 99  # neither the caller's arrays nor the answer alias the store's
    held["b"][:] = 99

    assert version == 1
    assert_equal(store.pull()[1], initial())


def test_a_second_init_keeps_the_held_values_and_answers_with_them() -> None:
    store = make_store(pushes=2)
    trained = store.pull()[1]

    version, held = store.init(initial())

    assert version == 3
    assert_equal(held, trained)
    assert_equal(store.pull()[1], trained)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({**initial(), "extra": np.zeros(1, np.float32)}, "init: tensor 'extra' is not held here; held: b, w"),
        ({"w": initial()["w"]}, "init: held tensor 'b' is missing from the request"),
        ({**initial(), "w": np.zeros((3, 2), np.float32)}, "init: tensor 'w' is held with shape (2, 3), got (3, 2)"),
    ],
    ids=["extra tensor", "missing tensor", "other shape"],
)
def test_init_with_another_layout_fails_and_changes_nothing(tensors: dict[str, np.ndarray], message: str) -> None:
    store = make_store(pushes=1)
    before = store.snapshot()

    with pytest.raises(FailedPrecondition) as info:
        store.init(tensors)

    assert str(info.value) == message
    assert_same_snapshot(store.snapshot(), before)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({}, "init: at least one tensor is required"),
        ({"": np.zeros(1, np.float32)}, "init: tensor names must be non-empty"),
        ({"w": np.array([1.0, np.nan], np.float32)}, "init tensor 'w': 1 non-finite value(s)"),
        ({"w": np.array([np.inf], np.float32)}, "init tensor 'w': 1 non-finite value(s)"),
    ],
)
def test_init_rejects_bad_tensors_and_stays_uninitialized(tensors: dict[str, np.ndarray], message: str) -> None:
    store = DenseStore(SGD)

    with pytest.raises(InvalidArgument) as info:
        store.init(tensors)

    assert str(info.value).startswith(message)
    assert store.stats().num_tensors == 0


# --------------------------------------------------------------------------- pull


def test_pull_sends_only_when_newer_than_the_callers_version() -> None:
    store = make_store()

    assert store.pull(if_newer_than=0)[0] == 1
    assert store.pull(if_newer_than=1) == (1, None)
    assert store.pull(if_newer_than=5) == (1, None)
    store.push(ones())
    version, tensors = store.pull(if_newer_than=1)

    assert version == 2
    assert_equal(tensors, {n: v - 0.125 for n, v in initial().items()})


def test_pull_of_named_tensors_sends_only_those() -> None:
    version, tensors = make_store().pull(["w"])

    assert version == 1
    assert_equal(tensors, {"w": initial()["w"]})


@pytest.mark.parametrize(
    ("names", "if_newer_than", "message"),
    [
        (["w", "nope", "also"], 0, "pull: unknown tensor(s) 'also', 'nope'; held: b, w"),
        (["w", "b", "w"], 0, "pull: tensor(s) 'w' named more than once"),
        ([], -1, "if_newer_than must be >= 0, got -1"),
    ],
)
def test_pull_rejects_bad_requests(names: list[str], if_newer_than: int, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        make_store().pull(names, if_newer_than)

    assert str(info.value) == message


def test_pulled_arrays_are_copies() -> None:
    store = make_store()
    _, tensors = store.pull()
    assert tensors is not None

    tensors["w"][:] = 42

    assert_equal(store.pull()[1], initial())


# --------------------------------------------------------------------------- push


def test_push_applies_sgd_once_and_bumps_the_version() -> None:
    store = make_store()

    version = store.push({"w": np.full((2, 3), 2.0, np.float32), "b": np.array([1.0, -1.0], np.float32)})

    assert version == 2
    expected = {"w": initial()["w"] - 0.25, "b": np.array([0.375, -0.375], np.float32)}
    assert_equal(store.pull()[1], expected)


def test_push_pull_answers_with_the_parameters_its_push_left() -> None:
    store = make_store()

    version, params = store.push_pull({"b": np.ones(2, np.float32)})

    assert version == 2
    expected = {"w": initial()["w"], "b": initial()["b"] - 0.125}
    assert_equal(params, expected)
    params["b"][:] = 0.0  # a copy: the store keeps its own
    assert_equal(store.pull()[1], expected)


def test_a_push_may_carry_a_subset_of_the_tensors() -> None:
    store = make_store()

    assert store.push({"b": np.ones(2, np.float32)}) == 2

    assert_equal(store.pull()[1], {"w": initial()["w"], "b": initial()["b"] - 0.125})


def test_float64_gradients_are_applied_as_float32() -> None:
    store = make_store()

    store.push({"b": np.ones(2, np.float64)})

    assert_equal(store.pull(["b"])[1], {"b": initial()["b"] - 0.125})


BAD_PUSHES: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("empty", lambda: {}, "push: at least one gradient is required"),
    ("unknown names", lambda: {**ones(), "x": np.ones(1, np.float32), "a": np.ones(1, np.float32)},
     "push: unknown tensor(s) 'a', 'x'; held: b, w"),
    ("wrong shape", lambda: {"b": np.ones(2, np.float32), "w": np.ones((3, 2), np.float32)},
     "gradient 'w': expected shape (2, 3), got (3, 2)"),
    ("wrong rank", lambda: {"b": np.ones((2, 1), np.float32)}, "gradient 'b': expected shape (2,), got (2, 1)"),
    ("nan", lambda: {"b": np.ones(2, np.float32), "w": np.full((2, 3), np.nan, np.float32)},
     "gradient 'w': 6 non-finite value(s) (NaN or Inf), first at index (0, 0)"),
    ("inf", lambda: {"b": np.array([1.0, -np.inf], np.float32)},
     "gradient 'b': 1 non-finite value(s) (NaN or Inf), first at index (1,)"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in BAD_PUSHES], ids=[c[0] for c in BAD_PUSHES])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_rejected_push_changes_nothing(make: Callable[[], dict[str, Any]], message: str, kind: str) -> None:
    store = make_store(DenseOptimizerConfig(kind=kind), pushes=2)
    before, stats = store.snapshot(), store.stats()

    with pytest.raises(InvalidArgument) as info:
        store.push(make())

    assert str(info.value) == message
    assert_same_snapshot(store.snapshot(), before)  # parameters, optimizer state and step
    after = store.stats()
    assert (after.version, after.pushes, after.rejected_pushes) == (3, 2, stats.rejected_pushes + 1)


def test_stats_count_sizes_pushes_and_rejections() -> None:
    store = make_store(DenseOptimizerConfig(kind="adam"), pushes=3)
    with pytest.raises(MonolithError):
        store.push({})
    store.count_rejected_push()

    stats = store.stats()

    assert (stats.version, stats.num_tensors, stats.parameters) == (4, 2, 8)
    assert stats.bytes == 8 * 4 * 3  # parameters, m and v
    assert (stats.pushes, stats.rejected_pushes, stats.optimizer) == (3, 2, "adam")


def test_pushes_from_four_threads_are_all_applied_and_pulls_never_see_half_a_push() -> None:
    store = make_store()
    pushes_per_thread = 50
    seen: list[tuple[int, dict[str, np.ndarray] | None]] = []
    stop = threading.Event()

    def push() -> None:
        for _ in range(pushes_per_thread):
            store.push(ones())

    def pull() -> None:
        while not stop.is_set():
            seen.append(store.pull())

    pushers = [threading.Thread(target=push) for _ in range(4)]
    puller = threading.Thread(target=pull)
    puller.start()
    for t in pushers:
        t.start()
    for t in pushers:
        t.join()
    stop.set()
    puller.join()

    assert store.version == 1 + 4 * pushes_per_thread
    assert store.stats().pushes == 4 * pushes_per_thread
    assert_equal(store.pull()[1], {n: v - 0.125 * 4 * pushes_per_thread for n, v in initial().items()})
    assert seen
    for version, tensors in seen:  # each pull saw exactly the pushes its version counts
        assert_equal(tensors, {n: v - 0.125 * (version - 1) for n, v in initial().items()})


# --------------------------------------------------------------------------- snapshots


def test_snapshot_holds_version_parameters_and_flat_optimizer_state() -> None:
    store = make_store(DenseOptimizerConfig(kind="adagrad"), pushes=2)

    snapshot = store.snapshot()

    assert snapshot.version == 3
    assert_equal(snapshot.tensors, store.pull()[1])  # type: ignore[arg-type]
    assert sorted(snapshot.optimizer_state) == ["b/accumulator", "step", "w/accumulator"]
    assert int(snapshot.optimizer_state["step"]) == 2
    np.testing.assert_allclose(snapshot.optimizer_state["w/accumulator"], np.full((2, 3), 2.1, np.float32))


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_restore_into_a_fresh_store_continues_identically(kind: str) -> None:
    config = DenseOptimizerConfig(kind=kind, learning_rate=0.01)
    original = make_store(config, pushes=2)
    copy = DenseStore(config)

    copy.restore(*original.snapshot())
    assert copy.init(initial())[0] == 3  # a trainer joining the restored store gets its values
    for store in (original, copy):
        store.push({"w": np.full((2, 3), 0.5, np.float32)})

    assert_same_snapshot(copy.snapshot(), original.snapshot())


def test_restore_replaces_other_names_and_shapes() -> None:
    store = make_store(pushes=1)

    store.restore(7, {"z": np.ones(4, np.float32)}, {"step": np.array(6)})

    assert store.version == 7
    assert_equal(store.pull()[1], {"z": np.ones(4, np.float32)})
    assert store.push({"z": np.ones(4, np.float32)}) == 8


def _adam_snapshot() -> DenseSnapshot:
    return make_store(DenseOptimizerConfig(kind="adam"), pushes=1).snapshot()


BAD_RESTORES: list[tuple[str, Callable[[DenseSnapshot], tuple[Any, ...]], str]] = [
    ("version 0", lambda s: (0, s.tensors, s.optimizer_state), "restore: version must be an integer >= 1, got 0"),
    ("no tensors", lambda s: (2, {}, {"step": np.array(1)}), "restore: at least one tensor is required"),
    ("missing state", lambda s: (2, s.tensors, {k: v for k, v in s.optimizer_state.items() if k != "w/v"}),
     "missing ['w/v'], unexpected []"),
    ("sgd state for adam", lambda s: (2, s.tensors, {"step": np.array(1)}),
     "the adam optimizer: missing ['b/m', 'b/v', 'w/m', 'w/v']"),
    ("state of another shape", lambda s: (2, s.tensors, {**s.optimizer_state, "b/m": np.zeros(3, np.float32)}),
     "restore: optimizer state 'b/m': expected shape (2,), got (3,)"),
    ("nan state", lambda s: (2, s.tensors, {**s.optimizer_state, "b/m": np.full(2, np.nan, np.float32)}),
     "restore: optimizer state 'b/m': 2 non-finite value(s)"),
    ("negative step", lambda s: (2, s.tensors, {**s.optimizer_state, "step": np.array(-1)}),
     "restore: optimizer state 'step' must be an integer >= 0, got -1"),
    ("inf tensor", lambda s: (2, {**s.tensors, "b": np.full(2, np.inf, np.float32)}, s.optimizer_state),
     "restore: tensor 'b': 2 non-finite value(s)"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in BAD_RESTORES], ids=[c[0] for c in BAD_RESTORES])
def test_a_rejected_restore_changes_nothing(make: Callable[[DenseSnapshot], tuple[Any, ...]], message: str) -> None:
    store = make_store(DenseOptimizerConfig(kind="adam"), pushes=3)
    before = store.snapshot()

    with pytest.raises(InvalidArgument) as info:
        store.restore(*make(_adam_snapshot()))

    assert message in str(info.value)
    assert_same_snapshot(store.snapshot(), before)
