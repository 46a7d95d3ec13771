"""The honest learning protocol: validation inside the first 80%, peers on the same examples,
the ablations' hashed tables and stale scoring copies, and the sweep's config overrides.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from monolith.harness.bench import peers
from monolith.harness.bench.sweep import grid_points, override, parse_setting
from monolith.data.batch import Batch
from monolith.data.buckets import hashed_into_buckets
from monolith.data.movielens import load_movielens
from monolith.model.config import ModelConfig, default_config_path, load_model_config
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.trainer.evaluation import progressive_validation, tuning_data, validation_protocol
from monolith.trainer.scoring_copy import ScoringCopy
from monolith.trainer.worker import TrainerWorker

N = 2000


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return load_model_config(default_config_path())


@pytest.fixture(scope="module")
def data() -> Batch:
    """The first 2,000 MovieLens examples, timestamps replaced by their position (to trace them)."""
    batch = load_movielens(limit=N)
    return Batch(batch.ids, batch.row_splits, batch.labels, np.arange(N))


def scrambled_tail(data: Batch) -> Batch:
    """`data` with the labels of its last 20% replaced by noise."""
    labels = data.labels.copy()
    cut = round(N * 0.8)
    labels[cut:] = np.random.default_rng(0).integers(0, 2, N - cut)
    return Batch(data.ids, data.row_splits, labels, data.timestamps)


class RecordingWorker(TrainerWorker):
    """A real worker that remembers every example (by timestamp) it trained on or scored."""

    seen: list[int]

    def train(self, batch):  # type: ignore[no-untyped-def]
        self.seen.extend(batch.timestamps.tolist())
        return super().train(batch)

    def train_stream(self, batches):  # type: ignore[no-untyped-def]
        def recorded():  # type: ignore[no-untyped-def]
            for batch in batches:
                self.seen.extend(batch.timestamps.tolist())
                yield batch

        return super().train_stream(recorded())

    def predict(self, batch):  # type: ignore[no-untyped-def]
        self.seen.extend(batch.timestamps.tolist())
        return super().predict(batch)


def recording_worker(config: ModelConfig) -> RecordingWorker:
    worker = RecordingWorker(config, LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer))
    worker.seen = []
    return worker


# --------------------------------------------------------------------------- the split


def test_no_example_of_the_last_20_percent_reaches_validation(config: ModelConfig, data: Batch) -> None:
    worker = recording_worker(config)

    result = validation_protocol(worker, data, show_progress=False)
    worker.close()

    assert max(worker.seen) == round(0.8 * N) - 1 and min(worker.seen) == 0
    # Batch training on the first 60%, progressive validation over 60-80%.
    assert (result.train_examples, result.eval_examples) == (1200, 400)
    assert len(tuning_data(data)) == 1600


def test_the_validation_figure_does_not_depend_on_the_last_20_percent(config: ModelConfig, data: Batch) -> None:
    figures = []
    for batch in (data, scrambled_tail(data)):
        worker = TrainerWorker(config, LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer))
        figures.append(validation_protocol(worker, batch, show_progress=False).progressive_auc)
        worker.close()

    assert figures[0] == figures[1]


def test_peer_grids_are_chosen_without_the_last_20_percent(data: Batch) -> None:
    clean, noisy = peers.run_bias_lr(data), peers.run_bias_lr(scrambled_tail(data))

    assert clean.grid == noisy.grid and clean.config == noisy.config
    assert clean.validation_auc == noisy.validation_auc
    assert clean.progressive_auc != noisy.progressive_auc  # the reported figure is over the last 20%

    lengths: list[int] = []

    def spy(examples: peers.PeerExamples) -> np.ndarray:
        lengths.append(len(examples))
        return np.zeros(len(examples))

    peers.choose_on_validation({"a": spy, "b": spy}, peers.PeerExamples.from_batch, data)
    assert lengths == [1600, 1600, N]  # both points on the tuning part, then the chosen one on all


# --------------------------------------------------------------------------- peers read our examples


def test_peer_examples_are_the_batch_examples_in_order(data: Batch) -> None:
    examples = peers.PeerExamples.from_batch(data)

    assert examples.feature_names == data.features
    np.testing.assert_array_equal(examples.labels, data.labels)
    for e in range(0, N, 37):
        entries = slice(examples.splits[e], examples.splits[e + 1])
        for f, name in enumerate(data.features):
            mine = examples.ids[entries][examples.features[entries] == f]
            theirs = data.ids[name][data.row_splits[name][e] : data.row_splits[name][e + 1]]
            np.testing.assert_array_equal(mine, theirs)
            np.testing.assert_allclose(examples.values[entries][examples.features[entries] == f], 1 / len(theirs))


def test_vw_lines_carry_the_batch_examples_in_order(data: Batch) -> None:
    lines = peers.PeerExamples.from_batch(data).vw_lines()

    assert len(lines) == N
    for e, line in enumerate(lines):
        label, user, item = re.fullmatch(r"(1|-1) \|u (.*) \|i (.*)", line).groups()  # type: ignore[union-attr]
        assert label == ("1" if data.labels[e] else "-1")
        parsed: dict[str, list[int]] = {}
        for side, tokens in (("u", user), ("i", item)):
            for token in tokens.split():
                name, value = token.split(":")[0].split("=")
                assert (side == "i") == (name in peers.ITEM_FEATURES)
                parsed.setdefault(name, []).append(int(value))
        for name in data.features:
            expected = data.ids[name][data.row_splits[name][e] : data.row_splits[name][e + 1]]
            assert parsed[name] == expected.tolist(), (e, name)
    # The tuning part's stream is the start of the full stream, in the same order.
    assert peers.PeerExamples.from_batch(tuning_data(data)).vw_lines() == lines[:1600]


def test_peers_score_each_example_before_learning_from_it(data: Batch) -> None:
    examples = peers.PeerExamples.from_batch(data.slice(0, 300))
    flipped = peers.PeerExamples(examples.features, examples.ids, examples.values, examples.splits,
                                 np.concatenate([examples.labels[:-1], 1 - examples.labels[-1:]]),
                                 examples.feature_names)  # fmt: skip

    scores = peers.bias_lr_scores(examples, 0.3)
    assert scores[0] == 0.0  # every weight starts at zero
    # An example's own label never reaches its score; earlier labels do.
    assert peers.bias_lr_scores(flipped, 0.3)[-1] == scores[-1]
    assert not np.array_equal(scores[1:], peers.bias_lr_scores(examples, 0.1)[1:])

    lines, flipped_lines = examples.vw_lines(), flipped.vw_lines()
    arguments = peers.vw_arguments("quadratic", 0.5)
    vw = peers.vw_scores(lines, arguments)
    assert vw.shape == (300,) and vw[0] == 0.0
    assert peers.vw_scores(flipped_lines, arguments)[-1] == vw[-1]
    assert len(set(np.round(vw, 6))) > 10  # it learns as it goes


# --------------------------------------------------------------------------- the ablations


def test_the_hashed_ablation_really_collides(config: ModelConfig, data: Batch) -> None:
    hashed = hashed_into_buckets(data, 10)  # the first 2,000 ratings come from 22 users
    sparse = LocalEmbeddings(config.tables())
    worker = TrainerWorker(config, sparse, LocalDense(config.model.optimizer))
    for batch in hashed.batches(256):
        worker.train(batch)
    worker.close()

    for name in ("user_id", "movie_id"):
        distinct_ids = len(np.unique(data.ids[name]))
        assert len(sparse.tables[name]) == len(np.unique(hashed.ids[name])) <= 10 < distinct_ids
    np.testing.assert_array_equal(hashed.labels, data.labels)
    assert all(np.array_equal(hashed.row_splits[f], data.row_splits[f]) for f in data.features)
    with pytest.raises(ValueError, match="buckets must be >= 1"):
        hashed_into_buckets(data, 0)


def test_a_refresh_interval_as_long_as_the_stream_scores_as_frozen(config: ModelConfig, data: Batch) -> None:
    sparse, dense = LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer)
    worker = TrainerWorker(config, sparse, dense)
    stream = N - round(0.8 * N)
    copies = [ScoringCopy(config, worker.model, sparse, dense, interval) for interval in (1, 100, stream)]

    result = progressive_validation(worker, data, show_progress=False, copies=copies)
    worker.close()

    assert result.refresh_auc[stream] == pytest.approx(result.frozen_auc, abs=1e-9)
    assert copies[2].refreshes == 1  # at the start of the stream only
    assert result.refresh_auc[1] == pytest.approx(result.progressive_auc, abs=1e-9)
    assert copies[1].refreshes == 1 + (stream - 1) // 100
    # Refreshed in between: neither the live parameters nor the frozen ones.
    assert result.refresh_auc[100] not in (result.progressive_auc, result.frozen_auc)


def test_a_scoring_copy_scores_what_it_was_last_given(config: ModelConfig, data: Batch) -> None:
    sparse, dense = LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer)
    worker = TrainerWorker(config, sparse, dense)
    copy = ScoringCopy(config, worker.model, sparse, dense, interval=10**9)
    first, second, probe = data.slice(0, 500), data.slice(500, 1000), data.slice(1000, 1200)
    for batch in first.batches(64):
        worker.train(batch)

    copy.refresh()  # a full copy (since version 0)
    np.testing.assert_allclose(copy.predict(probe), worker.predict(probe), rtol=1e-6)
    held = copy.predict(probe)
    for batch in second.batches(64):
        worker.train(batch)
    assert not np.allclose(worker.predict(probe), held, atol=1e-4)
    np.testing.assert_array_equal(copy.predict(probe), held)  # stale until refreshed

    copy.refresh()  # incremental: only what changed since the first refresh
    np.testing.assert_allclose(copy.predict(probe), worker.predict(probe), rtol=1e-6)
    worker.close()


# --------------------------------------------------------------------------- the sweep


def test_sweep_overrides_one_feature_or_all_without_touching_the_others() -> None:
    with open(default_config_path(), encoding="utf-8") as f:
        raw = yaml.safe_load(f)

    one = override(raw, "features.user_id.optimizer.learning_rate", 0.7)
    every = override(raw, "features.*.bias.optimizer.learning_rate", 0.9)

    rates = [f["optimizer"]["learning_rate"] for f in one["features"]]
    assert rates == [0.7] + [raw["features"][1]["optimizer"]["learning_rate"]] * (len(rates) - 1)
    assert {f["bias"]["optimizer"]["learning_rate"] for f in every["features"]} == {0.9}
    assert raw["features"][0]["optimizer"]["learning_rate"] != 0.7  # the original is untouched
    assert parse_setting("training.online_batch_size=1,4") == ("training.online_batch_size", [1, 4])
    settings = [parse_setting("training.online_batch_size=1,4"), parse_setting("model.hidden_units=[8]")]
    points = grid_points(raw, settings)
    assert [p[0] for p in points] == ["training.online_batch_size=1, model.hidden_units=[8]",
                                      "training.online_batch_size=4, model.hidden_units=[8]"]  # fmt: skip
    assert [p[1].training.online_batch_size for p in points] == [1, 4]
    with pytest.raises(ValueError, match="no item named 'nope'"):
        override(raw, "features.nope.dim", 4)
    with pytest.raises(ValueError, match="expected path=value"):
        parse_setting("training.batch_size")
