"""PredictBatcher: concurrent calls scored together give each call exactly its unbatched scores.

The model is the shipped MovieLens config (one small hidden layer) trained a few steps on
local tables; calls are ranking calls (one user, N candidates) as a product backend sends.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import numpy as np
import pytest

from helpers.models import small_config, trained_serving_model
from monolith.common.config import parse_config
from monolith.common.errors import Cancelled, ConfigError, DeadlineExceeded, Unavailable
from monolith.data.movielens import raw_feature_values
from monolith.model.config import ModelConfig
from monolith.serving.batching import BatchingConfig, PredictBatcher
from monolith.serving.limits import Deadline
from monolith.serving.model import ServingModel

USER_FEATURES = ("user_id", "age", "gender", "occupation", "zip")


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return small_config()


@pytest.fixture(scope="module")
def model(config: ModelConfig) -> ServingModel:
    return trained_serving_model(config, examples=1024)


def ranking_calls(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Calls of one user (outer size 1) and 1 to 60 candidates each."""
    raw = raw_feature_values()
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(count):
        user = raw["users"][int(rng.integers(len(raw["users"])))]
        movies = [raw["movies"][int(i)] for i in rng.choice(len(raw["movies"]), int(rng.integers(1, 61)), replace=False)]
        width = max(len(m["genres"]) for m in movies)
        call: dict[str, Any] = {name: np.array([user[name]], dtype=object) for name in USER_FEATURES}
        call["movie_id"] = np.array([m["movie_id"] for m in movies], np.int64)
        call["genres"] = np.array([m["genres"] + [""] * (width - len(m["genres"])) for m in movies], dtype=object)
        calls.append(call)
    return calls


class Recording:
    """A ServingModel stand-in that records each batch it scores and can be held back."""

    def __init__(self, model: ServingModel) -> None:
        self.model = model
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def score_versioned(self, ids: Any, row_splits: Any, batch: int, deadline: Deadline = Deadline()) -> Any:
        self.batches.append(batch)
        self.entered.set()
        assert self.release.wait(10.0)
        return self.model.score_versioned(ids, row_splits, batch, deadline)


def test_batched_scores_equal_unbatched_scores_exactly(model: ServingModel) -> None:
    calls = ranking_calls(40)
    expected = [model.predict(call) for call in calls]
    recording = Recording(model)
    batcher = PredictBatcher(recording, BatchingConfig(max_examples=512, timeout_micros=20_000, threads=2))  # type: ignore[arg-type]
    with futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda call: batcher.score(*model.parse(call))[0], calls))
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have, want)
    assert sum(recording.batches) == sum(len(e) for e in expected)
    assert len(recording.batches) < len(calls)  # calls were scored together
    assert max(recording.batches) <= 512


def test_a_batch_takes_what_is_queued_up_to_the_bound(model: ServingModel) -> None:
    calls = ranking_calls(6, seed=1)
    parsed = [model.parse(call) for call in calls]
    recording = Recording(model)
    recording.release.clear()  # the batch thread is held in the first batch while the others queue
    batcher = PredictBatcher(recording, BatchingConfig(max_examples=10_000, timeout_micros=0, threads=1))  # type: ignore[arg-type]
    with futures.ThreadPoolExecutor(6) as pool:
        first = pool.submit(batcher.score, *parsed[0])
        assert recording.entered.wait(10.0)
        rest = [pool.submit(batcher.score, *p) for p in parsed[1:]]
        time.sleep(0.2)  # the five calls queue behind the held batch
        recording.release.set()
        results = [first.result(10.0)] + [f.result(10.0) for f in rest]
    assert recording.batches == [parsed[0][2], sum(p[2] for p in parsed[1:])]
    for (scores, _), call in zip(results, calls):
        np.testing.assert_array_equal(scores, model.predict(call))


def test_a_deadline_passing_in_the_queue_fails_that_call_alone(model: ServingModel) -> None:
    calls = ranking_calls(3, seed=2)
    parsed = [model.parse(call) for call in calls]
    recording = Recording(model)
    recording.release.clear()
    batcher = PredictBatcher(recording, BatchingConfig(max_examples=10_000, timeout_micros=0, threads=1))  # type: ignore[arg-type]
    with futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.score, *parsed[0])
        assert recording.entered.wait(10.0)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="while queued for batching"):
            batcher.score(*parsed[1], deadline=Deadline.after(0.1))
        waited = time.monotonic() - started
        patient = pool.submit(batcher.score, *parsed[2])
        recording.release.set()
        np.testing.assert_array_equal(first.result(10.0)[0], model.predict(calls[0]))
        np.testing.assert_array_equal(patient.result(10.0)[0], model.predict(calls[2]))
    assert waited < 5.0  # it did not wait for the held batch
    # The expired call never reached the model: the second batch is the patient call alone.
    assert recording.batches == [parsed[0][2], parsed[2][2]]


def test_a_cancelled_call_leaves_the_queue(model: ServingModel) -> None:
    parsed = [model.parse(call) for call in ranking_calls(2, seed=3)]
    recording = Recording(model)
    recording.release.clear()
    batcher = PredictBatcher(recording, BatchingConfig(max_examples=10_000, timeout_micros=0, threads=1))  # type: ignore[arg-type]
    with futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.score, *parsed[0])
        assert recording.entered.wait(10.0)
        cancelled = threading.Event()
        second = pool.submit(batcher.score, *parsed[1], cancelled=cancelled)
        time.sleep(0.1)
        cancelled.set()
        with pytest.raises(Cancelled, match="while queued"):
            second.result(10.0)
        recording.release.set()
        first.result(10.0)
    assert recording.batches == [parsed[0][2]]


def test_a_failing_batch_fails_its_calls_with_the_error(model: ServingModel) -> None:
    class Failing:
        def score_versioned(self, *args: Any, **kwargs: Any) -> Any:
            raise Unavailable("embedding-PS shard 1 is unreachable")

    batcher = PredictBatcher(Failing(), BatchingConfig(threads=1))  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="unreachable"):
        batcher.score(*model.parse(ranking_calls(1)[0]))
    with pytest.raises(Unavailable, match="unreachable"):  # the slot was passed back: the next call runs too
        batcher.score(*model.parse(ranking_calls(1)[0]))


def test_a_call_finding_the_batcher_idle_is_scored_on_its_own_thread(model: ServingModel) -> None:
    threads = []

    class Where:
        def score_versioned(self, *args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread())
            return model.score_versioned(*args, **kwargs)

    batcher = PredictBatcher(Where(), BatchingConfig())  # type: ignore[arg-type]
    batcher.score(*model.parse(ranking_calls(1)[0]))

    assert threads == [threading.current_thread()]  # no hand-off to another thread


def test_the_timeout_lets_a_batch_fill_from_calls_arriving_after_it(model: ServingModel) -> None:
    parsed = [model.parse(call) for call in ranking_calls(3, seed=5)]
    recording = Recording(model)
    batcher = PredictBatcher(recording, BatchingConfig(timeout_micros=2_000_000, threads=1))  # type: ignore[arg-type]
    with futures.ThreadPoolExecutor(3) as pool:
        pending = []
        for p in parsed:
            pending.append(pool.submit(batcher.score, *p))
            time.sleep(0.05)  # each arrives while the first waits for its batch to fill
        for f in pending:
            f.result(10.0)

    assert recording.batches == [sum(p[2] for p in parsed)]


def test_under_contention_every_call_gets_its_scores_or_its_own_error(model: ServingModel) -> None:
    calls = ranking_calls(30, seed=6)
    expected = [model.predict(call) for call in calls]
    parsed = [model.parse(call) for call in calls]
    batcher = PredictBatcher(model, BatchingConfig(max_examples=300, threads=2))
    rng = np.random.default_rng(7)
    plans = [(i, float(rng.choice([0.0005, 0.005, 30.0])), bool(rng.random() < 0.2)) for i in range(600)]

    def one(plan: tuple[int, float, bool]) -> str:
        i, seconds, cancel = plan
        cancelled = threading.Event()
        if cancel:
            threading.Timer(0.001, cancelled.set).start()
        try:
            scores, _ = batcher.score(*parsed[i % 30], deadline=Deadline.after(seconds), cancelled=cancelled)
        except (DeadlineExceeded, Cancelled):
            return "abandoned"
        np.testing.assert_array_equal(scores, expected[i % 30])
        return "scored"

    with futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, plans))

    assert outcomes.count("scored") > 0 and len(outcomes) == 600
    scores, _ = batcher.score(*parsed[0])  # every slot came back
    np.testing.assert_array_equal(scores, expected[0])


def test_hash_before_broadcast_gives_the_ids_of_the_repeated_features(model: ServingModel) -> None:
    call = ranking_calls(1, seed=4)[0]
    n = len(call["movie_id"])
    repeated = {name: (np.repeat(a, n, axis=0) if a.shape[0] == 1 else a) for name, a in call.items()}
    ids, splits, batch = model.parse(call)
    ids_r, splits_r, batch_r = model.parse(repeated)
    assert batch == batch_r == n
    for name in ids:
        np.testing.assert_array_equal(ids[name], ids_r[name], err_msg=name)
        np.testing.assert_array_equal(splits[name], splits_r[name], err_msg=name)


@pytest.mark.parametrize(
    "raw, field",
    [({"max_examples": -1}, "max_examples"), ({"timeout_micros": -5}, "timeout_micros"), ({"threads": 0}, "threads")],
)
def test_bad_batching_settings_are_refused_by_name(raw: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_config(BatchingConfig, raw)
