"""ServingModel in process, on local tables trained for a few steps on MovieLens.

Requests carry raw values (ints and strings), as a product backend sends them; the
reference for every score is the trainer's own prediction on the same examples.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from helpers.models import small_raw_config
from monolith.common.errors import InvalidArgument, Unavailable
from monolith.data.batch import Batch
from monolith.data.feature_ids import feature_id, feature_ids
from monolith.data.movielens import load_movielens, raw_feature_values
from monolith.model.config import ModelConfig, model_config_from_dict
from monolith.model.scores import sigmoid
from monolith.serving.model import MAX_BATCH, ServingModel
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.trainer.worker import TrainerWorker

Request = dict[str, np.ndarray]
USER_FEATURES = ("user_id", "age", "gender", "occupation", "zip")
SINGLE_VALUED = (*USER_FEATURES, "movie_id")
EXAMPLES = 48


def logit(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


@pytest.fixture(scope="module")
def raw_config() -> dict[str, Any]:
    """The shipped MovieLens config with one small hidden layer (quicker to trace)."""
    return small_raw_config()


@pytest.fixture(scope="module")
def config(raw_config: dict[str, Any]) -> ModelConfig:
    return model_config_from_dict(raw_config)


@pytest.fixture(scope="module")
def data() -> Batch:
    return load_movielens(limit=2000)


@dataclasses.dataclass
class Trained:
    worker: TrainerWorker
    sparse: LocalEmbeddings
    dense: LocalDense


@pytest.fixture(scope="module")
def trained(config: ModelConfig, data: Batch) -> Trained:
    """A worker after one pass over the 2,000 examples (8 steps), so rows and dense updates exist."""
    sparse, dense = LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer)
    worker = TrainerWorker(config, sparse, dense)
    for batch in data.batches(256):
        worker.train(batch)
    return Trained(worker, sparse, dense)


@pytest.fixture(scope="module")
def model(config: ModelConfig, trained: Trained) -> ServingModel:
    served = ServingModel(config, trained.sparse, trained.dense)
    assert served.refresh_dense()
    assert served.dense_version == trained.worker.dense_version
    return served


def raw_examples(data: Batch, start: int, stop: int) -> Request:
    """The raw (unhashed) features of data[start:stop], one array per feature, as a Predict request.

    Ints stay ints, strings are object arrays (what the Predict API's tensors decode to), and
    genres are padded with "".
    """
    raw = raw_feature_values()
    users = {feature_id("user_id", u["user_id"]): u for u in raw["users"]}
    movies = {feature_id("movie_id", m["movie_id"]): m for m in raw["movies"]}
    rows_u = [users[int(i)] for i in data.ids["user_id"][start:stop]]
    rows_m = [movies[int(i)] for i in data.ids["movie_id"][start:stop]]
    width = max(len(m["genres"]) for m in rows_m)
    request: Request = {"user_id": np.array([u["user_id"] for u in rows_u], np.int64)}
    for name in ("age", "gender", "occupation", "zip"):
        request[name] = np.array([u[name] for u in rows_u], dtype=object)
    request["movie_id"] = np.array([m["movie_id"] for m in rows_m], np.int64)
    request["genres"] = np.array([m["genres"] + [""] * (width - len(m["genres"])) for m in rows_m], dtype=object)
    return request


def batch_of(request: Request) -> Batch:
    """The training Batch of fully expanded raw features: the trainer's view of the same examples."""
    n = max(len(a) for a in request.values())
    ids, splits = {}, {}
    for name, values in request.items():
        if values.ndim == 1:
            values = np.repeat(values, n) if len(values) == 1 and n > 1 else values
            ids[name] = feature_ids(name, values)
            splits[name] = np.arange(n + 1, dtype=np.int64)
        else:
            values = np.repeat(values, n, axis=0) if len(values) == 1 and n > 1 else values
            rows = [[v for v in row if v != ""] for row in values]
            ids[name] = feature_ids(name, np.array([v for row in rows for v in row], dtype=object))
            splits[name] = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
    return Batch(ids, splits, np.zeros(n, np.float32), np.zeros(n, np.int64))


@pytest.fixture(scope="module")
def examples(data: Batch) -> Request:
    return raw_examples(data, 0, EXAMPLES)


def table_sizes(sparse: LocalEmbeddings) -> dict[str, int]:
    return {name: len(table) for name, table in sparse.tables.items()}


# --------------------------------------------------------------------------- scores


def test_raw_values_hash_to_the_ids_the_training_data_uses(data: Batch, examples: Request) -> None:
    # Serving and training must agree on ids, or a served request reads other rows.
    expected = data.slice(0, EXAMPLES)
    got = batch_of(examples)
    for name in expected.features:
        np.testing.assert_array_equal(got.ids[name], expected.ids[name], err_msg=name)
        np.testing.assert_array_equal(got.row_splits[name], expected.row_splits[name], err_msg=name)


def test_scores_equal_the_trainers_prediction_for_the_same_examples(
    model: ServingModel, trained: Trained, data: Batch, examples: Request
) -> None:
    scores = model.predict(examples)

    assert scores.dtype == np.float32 and scores.shape == (EXAMPLES,)
    np.testing.assert_allclose(scores, trained.worker.predict(data.slice(0, EXAMPLES)), rtol=0, atol=1e-6)
    # Trained rows and dense parameters are in play, not just the initial 0.5.
    assert np.all((scores > 0) & (scores < 1))
    assert np.std(scores) > 0.01 and np.max(np.abs(scores - 0.5)) > 0.05


def test_scores_are_sigmoid_of_the_dense_towers_logits(
    model: ServingModel, trained: Trained, config: ModelConfig, examples: Request
) -> None:
    batch = batch_of(examples)
    rows = trained.sparse.lookup(
        {**{f.table.name: batch.ids[f.source] for f in config.features},
         **{f.bias_table.name: batch.ids[f.source] for f in config.features if f.bias}}  # fmt: skip
    )
    _, params = trained.dense.pull()
    segments = [np.repeat(np.arange(len(batch)), np.diff(batch.row_splits[f.source])) for f in config.features]
    logits = model.model.logits(
        params,  # type: ignore[arg-type]
        [rows[f.table.name] for f in config.features],
        [rows[f.bias_table.name] for f in config.features if f.bias],
        segments,
        len(batch),
    )

    np.testing.assert_allclose(model.predict(examples), sigmoid(logits), rtol=0, atol=1e-6)


def test_a_request_is_scored_the_same_in_any_batch(model: ServingModel, examples: Request) -> None:
    whole = model.predict(examples)
    one = model.predict({name: values[3:4] for name, values in examples.items()})

    assert one.shape == (1,)
    assert one[0] == pytest.approx(whole[3], abs=1e-6)


# --------------------------------------------------------------------------- validation


def refused(model: ServingModel, request: dict[str, Any]) -> str:
    with pytest.raises(InvalidArgument) as info:
        model.predict(request)
    return str(info.value)


def test_an_unknown_input_is_named(model: ServingModel, examples: Request) -> None:
    message = refused(model, {**examples, "colour": np.array(["red"], dtype=object)})

    assert message.startswith("unknown input(s) colour;")
    assert "user_id" in message and "genres" in message and "request_id" in message


def test_missing_inputs_are_named(model: ServingModel, examples: Request) -> None:
    request = {k: v for k, v in examples.items() if k not in ("zip", "gender")}

    message = refused(model, request)

    assert message == "missing input(s) gender, zip; every feature must be sent"


def test_a_rank_3_input(model: ServingModel, examples: Request) -> None:
    message = refused(model, {**examples, "movie_id": examples["movie_id"].reshape(-1, 1, 1)})

    assert message == f"input 'movie_id': expects shape [batch] or [batch, k], got [{EXAMPLES}, 1, 1]"


def test_a_scalar_input(model: ServingModel, examples: Request) -> None:
    message = refused(model, {**examples, "gender": np.array("M", dtype=object)})

    assert message == "input 'gender': expects shape [batch] or [batch, k], got []"


@pytest.mark.parametrize("shape", [(0,), (0, 3)])
def test_an_outer_dimension_of_0(model: ServingModel, examples: Request, shape: tuple[int, ...]) -> None:
    message = refused(model, {**examples, "genres": np.zeros(shape, dtype=object)})

    assert message == "input 'genres': outer dimension is 0; send at least one example"


def test_an_outer_dimension_neither_1_nor_the_batch(model: ServingModel, examples: Request) -> None:
    message = refused(model, {**examples, "zip": examples["zip"][:2]})

    assert message.startswith(f"input 'zip': outer dimension 2 is neither 1 (broadcast) nor the batch size {EXAMPLES}")
    assert "zip: 2" in message and f"user_id: {EXAMPLES}" in message


def test_several_values_for_a_single_valued_feature(model: ServingModel, examples: Request) -> None:
    gender = np.repeat(examples["gender"].reshape(-1, 1), 3, axis=1)

    message = refused(model, {**examples, "gender": gender})

    assert message == f"input 'gender': the feature is single-valued; expects shape [batch], got [{EXAMPLES}, 3]"


def test_a_batch_over_the_limit(model: ServingModel, examples: Request) -> None:
    request = {name: values[:1] for name, values in examples.items()}
    request["movie_id"] = np.arange(MAX_BATCH + 1, dtype=np.int64)

    message = refused(model, request)

    assert message == f"batch of {MAX_BATCH + 1} examples; at most {MAX_BATCH} per request"


def test_a_bad_request_changes_no_table(model: ServingModel, trained: Trained, examples: Request) -> None:
    before = table_sizes(trained.sparse)
    refused(model, {**examples, "zip": examples["zip"][:2], "user_id": np.array([10**12] * EXAMPLES)})

    assert table_sizes(trained.sparse) == before


def test_unavailable_until_dense_parameters_are_loaded(
    config: ModelConfig, trained: Trained, examples: Request
) -> None:
    fresh = ServingModel(config, trained.sparse, trained.dense)
    assert not fresh.ready and fresh.dense_version == 0

    with pytest.raises(Unavailable, match="no dense parameters yet"):
        fresh.predict(examples)
    # A malformed request is still a malformed request, whatever the model's state.
    with pytest.raises(InvalidArgument):
        fresh.predict({"colour": np.array(["red"], dtype=object)})

    assert fresh.refresh_dense() and fresh.ready
    assert not fresh.refresh_dense()  # nothing newer
    assert fresh.predict(examples).shape == (EXAMPLES,)


# --------------------------------------------------------------------------- broadcast and encodings


def test_user_features_sent_once_broadcast_over_candidates(model: ServingModel, examples: Request) -> None:
    candidates = slice(10, 15)
    broadcast = {name: examples[name][:1] for name in USER_FEATURES}
    broadcast |= {name: examples[name][candidates] for name in ("movie_id", "genres")}
    repeated = {name: np.repeat(examples[name][:1], 5, axis=0) for name in USER_FEATURES}
    repeated |= {name: examples[name][candidates] for name in ("movie_id", "genres")}

    scores = model.predict(broadcast)

    assert scores.shape == (5,)
    np.testing.assert_array_equal(scores, model.predict(repeated))
    assert len(set(scores.tolist())) > 1  # the candidates are told apart


def test_everything_of_outer_size_1_is_a_batch_of_1(model: ServingModel, examples: Request) -> None:
    single = {name: values[:1] for name, values in examples.items()}

    assert model.predict(single).shape == (1,)


def test_a_multi_valued_feature_may_be_broadcast_too(model: ServingModel, examples: Request) -> None:
    request = {**examples, "genres": np.array([["Comedy", "Drama"]], dtype=object)}
    expanded = {**examples, "genres": np.array([["Comedy", "Drama"]] * EXAMPLES, dtype=object)}

    np.testing.assert_array_equal(model.predict(request), model.predict(expanded))


def test_batch_by_1_equals_batch_for_single_valued_features(model: ServingModel, examples: Request) -> None:
    columns = {**examples, **{name: examples[name].reshape(-1, 1) for name in SINGLE_VALUED}}

    np.testing.assert_array_equal(model.predict(columns), model.predict(examples))


def test_string_padding_equals_the_shorter_row(model: ServingModel, examples: Request) -> None:
    one = {name: values[:1] for name, values in examples.items()}
    padded = {**one, "genres": np.array([["Crime", "", "Thriller", ""]], dtype=object)}
    short = {**one, "genres": np.array([["Crime", "Thriller"]], dtype=object)}
    other = {**one, "genres": np.array([["Crime"]], dtype=object)}

    assert model.predict(padded)[0] == model.predict(short)[0]
    assert model.predict(other)[0] != model.predict(short)[0]  # genres matter, so the check means something


def test_padding_differs_per_row(model: ServingModel, examples: Request) -> None:
    rows = [["Comedy", ""], ["Crime", "Drama"], ["", ""]]
    padded = {name: np.repeat(values[:1], 3, axis=0) for name, values in examples.items()}
    padded["genres"] = np.array(rows, dtype=object)

    scores = model.predict(padded)

    for i, row in enumerate(rows):
        alone = {name: values[i : i + 1] for name, values in padded.items()}
        alone["genres"] = np.array([[v for v in row if v] or [""]], dtype=object)  # [[""]]: no genre at all
        assert scores[i] == pytest.approx(model.predict(alone)[0], abs=1e-6), row


def test_a_numpy_unicode_array_is_padded_like_an_object_array(model: ServingModel, examples: Request) -> None:
    """Padding with "" is honoured for numpy string arrays as for dtype=object arrays.

    A 2-D numpy string array (dtype '<U…', what `np.array([["Comedy", ""]])` gives an
    in-process caller) scores like the same object array. Regression: "" was once stripped
    only when `array.dtype == object`, and hashed as a genre id otherwise.
    """
    one = {name: values[:1] for name, values in examples.items()}
    as_object = {**one, "genres": np.array([["Comedy", ""]], dtype=object)}
    as_unicode = {**one, "genres": np.array([["Comedy", ""]])}
    assert as_unicode["genres"].dtype.kind == "U"

    assert model.predict(as_unicode)[0] == pytest.approx(model.predict(as_object)[0], abs=1e-6)


def test_ints_and_the_same_values_as_strings_score_the_same(model: ServingModel, examples: Request) -> None:
    as_strings = {**examples}
    for name in ("user_id", "movie_id"):
        as_strings[name] = np.array([str(v) for v in examples[name]], dtype=object)
    as_int32 = {**examples, "movie_id": examples["movie_id"].astype(np.int32)}

    scores = model.predict(examples)

    np.testing.assert_array_equal(model.predict(as_strings), scores)
    np.testing.assert_array_equal(model.predict(as_int32), scores)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("rate", [0.25, 0.05])
def test_log_odds_correction_for_negative_down_sampling(
    raw_config: dict[str, Any], model: ServingModel, trained: Trained, examples: Request, rate: float
) -> None:
    raw = copy.deepcopy(raw_config)
    raw.setdefault("training", {})["negative_sample_rate"] = rate
    corrected = ServingModel(model_config_from_dict(raw), trained.sparse, trained.dense)
    assert corrected.refresh_dense()

    p_rate, p_one = corrected.predict(examples), model.predict(examples)

    np.testing.assert_allclose(logit(p_rate) - logit(p_one), math.log(rate), rtol=0, atol=1e-4)
    assert np.all(p_rate < p_one)


# --------------------------------------------------------------------------- unknown ids


def test_unknown_ids_read_as_zeros_and_create_no_rows(
    model: ServingModel, trained: Trained, config: ModelConfig, examples: Request
) -> None:
    before = table_sizes(trained.sparse)
    unknown = {
        "user_id": np.array([10**12, 10**12 + 1]),
        "age": np.array(["no-such-age", "x"], dtype=object),
        "gender": np.array(["?", "??"], dtype=object),
        "occupation": np.array(["astronaut", "pirate"], dtype=object),
        "zip": np.array(["zzz", "yyy"], dtype=object),
        "movie_id": np.array([10**9, 10**9 + 1]),
        "genres": np.array([["Noir-Western", ""], ["a", "b"]], dtype=object),
    }

    scores = model.predict(unknown)

    assert table_sizes(trained.sparse) == before
    # With every embedding and bias zero, the logit is the global bias plus the MLP of zeros.
    _, params = trained.dense.pull()
    n = len(config.features)
    zeros = model.model.logits(
        params,  # type: ignore[arg-type]
        [np.zeros((2, f.table.dim), np.float32) for f in config.features],
        [np.zeros((2, 1), np.float32) for f in config.features if f.bias],
        [np.arange(2, dtype=np.int32)] * n,
        2,
    )
    np.testing.assert_allclose(scores, sigmoid(zeros), rtol=0, atol=1e-6)
    assert scores[0] == scores[1]

    # A known user with an unknown movie: the trainer (whose read-only lookup also reads
    # zeros for the movie) agrees, and still no row appears.
    mixed = {**examples, "movie_id": np.arange(10**9, 10**9 + EXAMPLES)}
    np.testing.assert_allclose(model.predict(mixed), trained.worker.predict(batch_of(mixed)), rtol=0, atol=1e-6)
    assert table_sizes(trained.sparse) == before
