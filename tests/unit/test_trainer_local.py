"""The trainer in one process: TrainerWorker on local tables and a local dense store,
the metrics, the evaluation protocol, the running-mean baseline and the progress line.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith.data.batch import Batch, single_valued
from monolith.data.movielens import load_movielens
from monolith.model.config import ModelConfig, default_config_path, load_model_config, model_config_from_dict
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.trainer.evaluation import evaluate, progressive_validation, running_mean_baseline
from monolith.model.scores import sigmoid
from monolith.model.quality import auc, log_loss
from monolith.trainer.progress import Progress
from monolith.trainer.worker import TrainerWorker

TRAIN = 3000


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return load_model_config(default_config_path())


@pytest.fixture(scope="module")
def data() -> Batch:
    """The first 4,000 MovieLens examples in time order."""
    return load_movielens(limit=4000)


@dataclasses.dataclass
class Local:
    worker: TrainerWorker
    sparse: LocalEmbeddings
    dense: LocalDense


def local_worker(config: ModelConfig) -> Local:
    sparse, dense = LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer)
    return Local(TrainerWorker(config, sparse, dense), sparse, dense)


@pytest.fixture(scope="module")
def trained(config: ModelConfig, data: Batch) -> tuple[Local, dict[str, float], dict[str, float]]:
    """A worker trained two passes over the first 3,000 examples, and its evaluation before and after."""
    local = local_worker(config)
    train = data.slice(0, TRAIN)
    before = evaluate(local.worker, train)
    for _ in range(2):
        for batch in train.batches(config.training.batch_size):
            local.worker.train(batch)
    return local, before, evaluate(local.worker, train)


def table_contents(sparse: LocalEmbeddings) -> dict[str, Any]:
    """Every table's stats and rows (with optimizer state and update times), sorted by id."""
    out = {}
    for name, table in sparse.tables.items():
        batches = list(table.export(since=0, include_state=True, max_rows=1 << 20))
        ids = np.concatenate([b.ids for b in batches]) if batches else np.zeros(0, np.int64)
        values = np.concatenate([b.values for b in batches]) if batches else np.zeros((0, table.width), np.float32)
        times = np.concatenate([b.update_times for b in batches]) if batches else np.zeros(0, np.uint32)
        order = np.argsort(ids)
        out[name] = (table.stats(), ids[order], values[order], times[order])
    return out


def assert_same_tables(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], name
        for x, y in zip(a[name][1:], b[name][1:]):
            np.testing.assert_array_equal(x, y, err_msg=name)


# --------------------------------------------------------------------------- the worker


def test_training_lowers_the_log_loss_on_the_training_examples(
    trained: tuple[Local, dict[str, float], dict[str, float]],
) -> None:
    local, before, after = trained

    # Before training no row exists: every embedding and bias reads as zero, so p = 0.5.
    assert before["log_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["auc"] == pytest.approx(0.5)
    assert after["log_loss"] < before["log_loss"] - 0.1
    assert after["auc"] > 0.75
    assert local.worker.steps == 2 * math.ceil(TRAIN / local.worker.config.training.batch_size)
    assert local.worker.dense_version == local.dense.store.version == 1 + local.worker.steps


def test_predict_changes_nothing(trained: tuple[Local, dict[str, float], dict[str, float]], data: Batch) -> None:
    local = trained[0]
    tables = table_contents(local.sparse)
    version, params = local.dense.store.version, local.dense.store.snapshot().tensors
    steps, dense_version = local.worker.steps, local.worker.dense_version

    seen = local.worker.predict(data.slice(0, 512))
    unseen = local.worker.predict(data.slice(TRAIN, len(data)))  # holds ids no training lookup saw

    assert seen.shape == (512,) and unseen.shape == (len(data) - TRAIN,)
    assert seen.dtype == np.float32
    assert np.all((seen > 0) & (seen < 1)) and np.all((unseen > 0) & (unseen < 1))
    assert_same_tables(table_contents(local.sparse), tables)
    assert local.dense.store.version == version
    for name, value in local.dense.store.snapshot().tensors.items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)
    assert (local.worker.steps, local.worker.dense_version) == (steps, dense_version)


def test_tables_gain_rows_only_for_training_lookups(config: ModelConfig, data: Batch) -> None:
    local = local_worker(config)
    first, later = data.slice(0, 256), data.slice(TRAIN, len(data))

    local.worker.predict(later)
    assert all(len(t) == 0 for t in local.sparse.tables.values())

    local.worker.train(first)
    rows = {name: len(table) for name, table in local.sparse.tables.items()}
    local.worker.predict(later)

    for feature in config.features:
        expected = len(np.unique(first.ids[feature.source]))
        assert rows[feature.table.name] == expected, feature.name
        assert rows[feature.bias_table.name] == expected, feature.bias_table.name  # type: ignore[union-attr]
        assert set(table_contents(local.sparse)[feature.table.name][1]) == set(first.ids[feature.source].tolist())
    assert {name: len(table) for name, table in local.sparse.tables.items()} == rows


def test_a_step_scores_its_batch_before_updating(config: ModelConfig, data: Batch) -> None:
    # Once every id of a batch has a row, train() returns the logits predict() gave just before.
    local = local_worker(config)
    batch = data.slice(0, 256)
    local.worker.train(batch)

    predicted = local.worker.predict(batch)
    result = local.worker.train(batch)
    after = local.worker.predict(batch)

    np.testing.assert_allclose(sigmoid(result.logits), predicted, rtol=1e-5, atol=1e-6)
    assert not np.allclose(after, predicted, atol=1e-4)


def test_dense_parameters_are_refreshed_every_k_steps(data: Batch) -> None:
    with open(default_config_path(), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["model"]["hidden_units"] = [8]
    raw["training"]["dense_refresh_steps"] = 3
    local = local_worker(model_config_from_dict(raw))
    versions = []

    for batch in data.slice(0, 4 * 64).batches(64):
        local.worker.train(batch)
        versions.append((local.worker.dense_version, local.dense.store.version))

    assert versions == [(1, 2), (1, 3), (4, 4), (4, 5)]


# --------------------------------------------------------------------------- metrics


def brute_force_auc(labels: list[bool], scores: list[float]) -> float:
    positives = [s for y, s in zip(labels, scores) if y]
    negatives = [s for y, s in zip(labels, scores) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(-3, 3)), min_size=2, max_size=40).filter(
        lambda pairs: len({y for y, _ in pairs}) == 2
    ),
    st.sampled_from([1.0, 0.1, -2.5]),
)
def test_auc_matches_pairwise_counting_with_ties(pairs: list[tuple[bool, int]], scale: float) -> None:
    # Few distinct integer scores, so ties are common; scaling by a negative number reverses the order.
    labels = [y for y, _ in pairs]
    scores = [s * scale for _, s in pairs]

    assert auc(np.array(labels, np.float32), np.array(scores)) == pytest.approx(brute_force_auc(labels, scores))


def test_auc_edges() -> None:
    assert auc(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3])) == 1.0
    assert auc(np.array([1, 0, 0]), np.array([0.1, 0.2, 0.3])) == 0.0
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    assert math.isnan(auc(np.array([0, 0]), np.array([0.1, 0.2])))


def test_log_loss() -> None:
    assert log_loss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert log_loss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    # A certain and wrong prediction is clipped to eps, not infinite.
    assert log_loss(np.array([0]), np.array([1.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert log_loss(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(-math.log(1 - 1e-7))


def test_sigmoid_is_stable_at_extremes() -> None:
    p = sigmoid(np.array([-1000.0, 0.0, 1000.0, math.log(3)]))

    assert p.dtype == np.float32
    np.testing.assert_allclose(p, [0.0, 0.5, 1.0, 0.75], atol=1e-7)


# --------------------------------------------------------------------------- evaluation


def test_running_mean_baseline_on_a_hand_made_batch() -> None:
    # Users A=1 (likes everything) and B=2 (likes nothing), items X=10 and Y=20; prior weight
    # 2. Each event's score is logit(ru) + logit(rm) of the smoothed rates before it, with p
    # the running global rate (positives + 1) / (events + 2):
    #   0: A X +  p=1/2  ru=1/2  rm=1/2                      score 0
    #   1: B Y -  p=2/3  ru=2/3  rm=2/3                      score ln 4      =  1.386
    #   2: A Y +  p=1/2  ru=2/3  rm=1/3                      score 0
    #   3: B X -  p=3/5  ru=2/5  rm=(1+6/5)/3=11/15          score ln(11/6)  =  0.606
    #   4: A X +  p=1/2  ru=3/4  rm=1/2                      score ln 3      =  1.099
    #   5: B Y -  p=4/7  ru=2/7  rm=(1+8/7)/4=15/28          score ln(6/13)  = -0.773
    batch = single_valued(
        {"user_id": np.array([1, 2, 1, 2, 1, 2]), "movie_id": np.array([10, 20, 20, 10, 10, 20])},
        labels=np.array([1, 0, 1, 0, 1, 0], np.float32),
        timestamps=np.arange(6),
    )

    # Events 1..5: positives 0 and 1.099 against negatives 1.386, 0.606, -0.773: 3 of 6 pairs.
    assert running_mean_baseline(batch, fraction=1 / 6) == pytest.approx(0.5)
    # Events 2..5: positives 0 and 1.099 against negatives 0.606, -0.773: 3 of 4 pairs.
    assert running_mean_baseline(batch, fraction=2 / 6) == pytest.approx(0.75)
    # Events 3..5: positive 1.099 against negatives 0.606, -0.773.
    assert running_mean_baseline(batch, fraction=3 / 6) == pytest.approx(1.0)


def test_progressive_validation_on_movielens(
    config: ModelConfig, data: Batch, capsys: pytest.CaptureFixture[str]
) -> None:
    local = local_worker(config)

    result = progressive_validation(local.worker, data, fraction=0.8, label="pv")

    assert (result.train_examples, result.eval_examples) == (3200, 800)
    assert 0.5 < result.frozen_auc < 1 and 0.5 < result.progressive_auc < 1
    assert result.examples_per_s > 0
    assert math.isfinite(result.final_train_loss) and 0 < result.final_train_loss < math.log(2)
    # One step per batch of the first part, then one per online batch of the stream.
    training = config.training
    assert local.worker.steps == math.ceil(3200 / training.batch_size) + math.ceil(800 / training.online_batch_size)
    stderr = capsys.readouterr().err
    assert "[pv: batch training] 3200/3200 examples" in stderr
    assert "[pv: progressive] 800/800 examples" in stderr


def test_progressive_validation_can_be_quiet(
    config: ModelConfig, data: Batch, capsys: pytest.CaptureFixture[str]
) -> None:
    local = local_worker(config)

    result = progressive_validation(local.worker, data.slice(0, 600), show_progress=False)

    assert (result.train_examples, result.eval_examples) == (480, 120)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- progress


def test_progress_lines_and_the_running_auc_window(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    progress = Progress("unit", total=24, window=10, interval=0.0)
    batches = [(rng.integers(0, 2, 4).astype(np.float32), rng.random(4).astype(np.float32)) for _ in range(6)]
    losses = [0.7, 0.6, 0.5, 0.4, 0.3, 0.2]

    for (labels, scores), loss in zip(batches, losses):
        progress.update(4, loss, labels, scores)
    progress.close()

    # The window keeps the fewest latest batches holding at least 10 examples: the last 3.
    window_labels = np.concatenate([b[0] for b in batches[-3:]])
    window_scores = np.concatenate([b[1] for b in batches[-3:]])
    assert progress.running_auc() == pytest.approx(auc(window_labels, window_scores))
    assert progress.examples == 24
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 7  # one per update (interval 0) and one on close
    assert all(line.startswith("[unit] ") for line in lines)
    assert lines[0].startswith("[unit] 4/24 examples, ")
    last = lines[-1]
    assert last.startswith("[unit] 24/24 examples, ")
    assert f"loss {np.mean(losses):.4f}" in last
    running = float(re.search(r"running auc ([0-9.]+)", last).group(1))  # type: ignore[union-attr]
    assert running == pytest.approx(progress.running_auc(), abs=5e-5)


def test_progress_without_predictions_or_when_disabled(capsys: pytest.CaptureFixture[str]) -> None:
    plain = Progress("plain", interval=0.0)
    plain.update(10)
    quiet = Progress("quiet", interval=0.0, enabled=False)
    quiet.update(10, 0.5, np.array([0.0, 1.0]), np.array([0.2, 0.8]))
    quiet.close()

    err = capsys.readouterr().err
    assert math.isnan(plain.running_auc())
    assert quiet.running_auc() == 1.0
    (line,) = err.strip().splitlines()  # only the enabled one printed
    assert line.startswith("[plain] 10 examples, ")
    assert "loss" not in line and "running auc" not in line


def test_a_stream_of_batches_trains_as_batch_after_batch(config: ModelConfig, data: Batch) -> None:
    # train_stream looks each batch up with the step before's update: the same tables, dense
    # parameters and per-step results as train() batch by batch.
    one_by_one, streamed = local_worker(config), local_worker(config)
    batches = list(data.slice(0, 1000).batches(128))

    results = [one_by_one.worker.train(b) for b in batches]
    pairs = list(streamed.worker.train_stream(iter(batches)))

    assert [b for b, _ in pairs] == batches
    for expected, (_, got) in zip(results, pairs):
        np.testing.assert_array_equal(got.logits, expected.logits)
        assert got.loss == expected.loss
    assert_same_tables(table_contents(one_by_one.sparse), table_contents(streamed.sparse))
    assert streamed.worker.steps == one_by_one.worker.steps == len(batches)
    assert list(local_worker(config).worker.train_stream(iter([]))) == []
