"""`monolith bench capacity`'s parts that need no stack: synthetic traffic, the pace rule, the rate search, the bars.

The benchmark itself (a stack driven for minutes) is run by hand; `bench capacity --quick`
takes several minutes, over what an e2e smoke test may take.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from monolith.data.feature_ids import feature_ids
from monolith.harness.bench import capacity, pace, stages
from monolith.harness.bench.synthetic import (
    AGES,
    GENDERS,
    ITEM_GENRES,
    OCCUPATIONS,
    BoundedZipf,
    SyntheticWorld,
    TrafficShape,
)
from monolith.streams.ids import action_message_id, impression_message_id
from monolith.streams.publish import MSG_ID_HEADER
from monolith.streams.reader import StoredMessage

SMALL = TrafficShape(users=20_000, items=2_000)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(SMALL, seed=7)


# ----------------------------------------------------------------------- generator


def test_the_default_world_is_at_the_issue_scale() -> None:
    shape = TrafficShape()
    assert shape.users >= 1_000_000 and shape.items >= 100_000
    assert (shape.min_candidates, shape.max_candidates) == (20, 100)


def test_bounded_zipf_stays_in_range_and_follows_the_law() -> None:
    zipf = BoundedZipf(1_000, 1.1)
    ranks = zipf.sample(np.random.default_rng(0), 200_000)
    assert ranks.min() >= 0 and ranks.max() < 1_000
    counts = np.bincount(ranks, minlength=1_000) / ranks.shape[0]
    # The head matches its probability; rank r is about 2**1.1 times as frequent as rank 2r.
    assert counts[0] == pytest.approx(zipf.probabilities[0], rel=0.03)
    assert counts[0] / counts[1] == pytest.approx(2**1.1, rel=0.05)
    assert counts[:10].sum() > 0.3 > counts[500:].sum()


def test_users_and_items_are_zipf_over_their_whole_id_range(world: SyntheticWorld) -> None:
    rng = np.random.default_rng(1)
    users, items = world.sample_users(rng, 100_000), world.sample_items(rng, 100_000)
    assert users.min() >= 1 and users.max() <= SMALL.users
    assert items.min() >= 1 and items.max() <= SMALL.items
    # Ranks are shuffled into ids: the most popular id is not id 1, yet it is far above average.
    top_user = np.bincount(users).argmax()
    assert top_user == world.user_of_rank[0] and np.bincount(users).max() > 50 * users.shape[0] / SMALL.users
    assert sorted(world.user_of_rank.tolist()) == list(range(1, SMALL.users + 1))


def test_requests_rank_20_to_100_distinct_candidates(world: SyntheticWorld) -> None:
    counts = []
    for k in range(600):
        request = world.request(k)
        assert 20 <= len(request) <= 100
        assert np.unique(request.items).shape[0] == len(request), "the joiner keys candidates by item"
        assert request.items.min() >= 1 and request.items.max() <= SMALL.items
        counts.append(len(request))
    assert min(counts) <= 22 and max(counts) >= 98  # both ends are reached
    assert np.mean(counts) == pytest.approx(SMALL.mean_candidates, abs=3)


def test_click_probabilities_are_the_known_model_and_clicks_follow_them(world: SyntheticWorld) -> None:
    requests = [world.request(k) for k in range(1_500)]
    probabilities = np.concatenate([r.probabilities for r in requests])
    clicks = np.concatenate([r.clicks for r in requests])
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    request = requests[0]
    liked = np.array([ITEM_GENRES[world.favourite[request.user]] in world.item_genres(int(i)) for i in request.items])
    logit = SMALL.base_logit + world.taste[request.user] + world.quality[request.items] + SMALL.affinity * liked
    np.testing.assert_allclose(request.probabilities, 1 / (1 + np.exp(-logit)), rtol=1e-5)
    # Over ~90,000 draws the click rate is the mean probability within a few standard errors.
    standard_error = math.sqrt(probabilities.mean() * (1 - probabilities.mean()) / probabilities.shape[0])
    assert clicks.mean() == pytest.approx(probabilities.mean(), abs=4 * standard_error)
    # The labels carry signal: clicked candidates had higher probabilities.
    assert probabilities[clicks].mean() > 1.5 * probabilities[~clicks].mean()
    assert np.array_equal(request.clicked, request.items[request.clicks])


def test_traffic_is_deterministic_per_seed_and_request_index() -> None:
    a, b, other = SyntheticWorld(SMALL, seed=3), SyntheticWorld(SMALL, seed=3), SyntheticWorld(SMALL, seed=4)
    for k in (0, 5, 123):
        ra, rb = a.request(k), b.request(k)
        assert ra.user == rb.user and np.array_equal(ra.items, rb.items) and np.array_equal(ra.clicks, rb.clicks)
        assert a.user_features(ra.user) == b.user_features(rb.user)
    # Request k does not depend on which requests were built before it.
    later = SyntheticWorld(SMALL, seed=3)
    assert np.array_equal(later.request(123).items, a.request(123).items)
    assert any(a.request(k).user != other.request(k).user for k in range(10))


def test_side_features_are_fixed_per_id_and_movielens_shaped(world: SyntheticWorld) -> None:
    user = world.request(0).user
    features = world.user_features(user)
    assert features["user_id"] == user and features["age"] in AGES and features["gender"] in GENDERS
    assert features["occupation"] in OCCUPATIONS and len(features["zip"]) == 3
    assert world.user_features(user) == features
    candidates = world.candidate_features(world.request(0).items)
    assert all(1 <= len(genres) <= 3 and set(genres) <= set(ITEM_GENRES) for genres in candidates["genres"])


def test_history_touches_every_user_once_with_the_ids_serving_would_hash(world: SyntheticWorld) -> None:
    history = world.history(start_time=1_700_000_000, span=3_600)
    assert len(history) == SMALL.users
    users = feature_ids("user_id", np.arange(1, SMALL.users + 1))
    assert np.array_equal(np.sort(history.ids["user_id"]), np.sort(users))
    assert np.all(np.diff(history.timestamps) >= 0) and history.timestamps[0] == 1_700_000_000
    assert 0.01 < history.labels.mean() < 0.5
    # Example 0's ids are the hashes of its raw features, as serving computes them.
    index = {int(h): u for h, u in zip(users, range(1, SMALL.users + 1))}
    raw = world.user_features(index[int(history.ids["user_id"][0])])
    for name in ("age", "gender", "occupation", "zip"):
        assert history.ids[name][0] == feature_ids(name, [raw[name]])[0]
    genres = history.ids["genres"][history.row_splits["genres"][0] : history.row_splits["genres"][1]]
    assert 1 <= genres.shape[0] <= 3


def test_a_shape_with_impossible_candidate_counts_is_refused() -> None:
    with pytest.raises(ValueError, match="candidates"):
        TrafficShape(items=10, min_candidates=20, max_candidates=100)
    with pytest.raises(ValueError, match="candidates"):
        TrafficShape(min_candidates=50, max_candidates=20)


# ----------------------------------------------------------------------------- pace


def step(**changes: object) -> pace.StepFigures:
    """A step that kept pace at 10 requests/s; `changes` break it."""
    figures = {
        "target_rps": 10.0, "seconds": 20.0, "requests": 200, "candidates": 12_000, "predict_errors": 0,
        "impressions_dropped": 0.0, "events_per_s": 30.0, "samples_per_s": 600.0,
        "joiner_lag": [0, 3, 1, 0, 2, 0, 1, 4], "trainer_backlog": [100, 300, 50, 900, 200, 120, 80, 150],
        "freshness_s": [0.4, 0.6, 1.1],
    }  # fmt: skip
    figures.update(changes)
    return pace.StepFigures(**figures)  # type: ignore[arg-type]


def test_a_step_that_kept_pace_has_no_reasons() -> None:
    good = step()
    assert pace.missed_pace(good) == []
    assert good.achieved_rps == 10.0 and good.candidates_per_s == 600.0


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"requests": 180}, "the generator sent 9.0 requests/s"),
        ({"predict_errors": 2}, "2 Predict calls failed"),
        ({"impressions_dropped": 1.0}, "dropped 1 impressions"),
        ({"impressions_dropped": math.nan}, "dropped nan impressions"),
        ({"joiner_lag": [0, 0, 0, 0, 40, 50, 60, 70]}, "the joiner's lag grew by 55 events"),
        ({"trainer_backlog": [0, 10, 0, 0, 700, 800, 900, 1000]}, "the trainers' backlog grew by 850 samples"),
        ({"freshness_s": [1.0, 6.0]}, "freshness p99 5.950 s > 5 s"),
        ({"freshness_s": []}, "no freshness probe finished"),
    ],
)
def test_each_way_of_missing_pace_is_named(changes: dict, says: str) -> None:
    reasons = pace.missed_pace(step(**changes))
    assert len(reasons) == 1 and says in reasons[0]


def test_backlog_growth_is_robust_to_one_spike_and_to_unreadable_readings() -> None:
    # One checkpoint pause at the step's end does not decide it; steady growth does.
    assert pace.growth([10, 10, 10, 10, 10, 10, 10, 5000]) == 0
    assert pace.growth([0, 100, 200, 300, 400, 500, 600, 700]) == 400
    assert pace.growth([math.nan, 5, 5, math.nan, 9, 9]) == 4
    assert math.isnan(pace.growth([math.nan, math.nan]))
    assert pace.growth([7]) == 0


def test_percentile_interpolates() -> None:
    assert pace.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert pace.percentile([1.0, 3.0], 99) == pytest.approx(2.98)
    assert math.isnan(pace.percentile([], 99))


def drive(search: pace.RateSearch, capacity_rps: float) -> list[float]:
    """Runs a search against a loop that keeps pace exactly up to `capacity_rps`; the rates tried."""
    tried = []
    while (rate := search.next_rate()) is not None:
        tried.append(rate)
        search.record(rate, rate <= capacity_rps)
    return tried


def test_the_search_doubles_then_bisects_to_the_resolution() -> None:
    search = pace.RateSearch(5.0, resolution=0.25, max_steps=10)
    tried = drive(search, capacity_rps=37.0)
    assert tried[:4] == [5.0, 10.0, 20.0, 40.0]
    assert tried[4] == pytest.approx(math.sqrt(20 * 40))
    assert search.best <= 37.0 < search.lowest_failure <= 1.25 * search.best
    assert len(tried) <= 10


def test_the_search_halves_when_the_start_is_too_fast_and_stops_at_the_floor() -> None:
    search = pace.RateSearch(16.0, max_steps=10, floor=1.0)
    tried = drive(search, capacity_rps=3.0)
    assert tried[:4] == [16.0, 8.0, 4.0, 2.0]
    assert search.best is not None and search.best <= 3.0 < search.lowest_failure <= 1.25 * search.best
    nothing = pace.RateSearch(4.0, max_steps=10, floor=1.0)
    assert drive(nothing, capacity_rps=0.1) == [4.0, 2.0, 1.0] and nothing.best is None


def test_the_search_stops_at_its_ceiling_and_after_max_steps() -> None:
    capped = pace.RateSearch(5.0, max_steps=10, ceiling=30.0)
    assert drive(capped, capacity_rps=1_000.0) == [5.0, 10.0, 20.0, 30.0] and capped.best == 30.0
    short = pace.RateSearch(5.0, max_steps=3)
    assert drive(short, capacity_rps=1_000.0) == [5.0, 10.0, 20.0]
    with pytest.raises(ValueError):
        pace.RateSearch(5.0, floor=10.0)


# ----------------------------------------------------------------------------- bars


def test_bars_are_exactly_the_issue_bars() -> None:
    good = {
        "loop_candidates_per_s": 600.0, "min_stage_candidates_per_s": 1_200.0,
        "joiner_samples_per_s": 5_000.0, "jetstream_publish_per_s": 10_000.0,
        "table_rows": 1_000_000, "samples_lost": 0, "samples_duplicated": 0,
    }  # fmt: skip
    assert {bar: check(good) for bar, check in capacity.BARS.items()} == {
        "loop_candidates_per_s>=0.5*min_stage_candidates_per_s": True,
        "joiner_samples_per_s>=0.5*jetstream_publish_per_s": True,
        "table_rows>=1000000": True, "samples_lost==0": True, "samples_duplicated==0": True,
    }  # fmt: skip
    bad = {
        "loop_candidates_per_s": 599.0, "min_stage_candidates_per_s": 1_200.0,
        "joiner_samples_per_s": 4_999.0, "jetstream_publish_per_s": 10_000.0,
        "table_rows": 999_999, "samples_lost": 1, "samples_duplicated": 1,
    }  # fmt: skip
    assert not any(check(bad) for check in capacity.BARS.values())


def test_a_step_that_missed_pace_points_at_the_stage_furthest_over_its_threshold() -> None:
    assert pace.implicated(step()) is None
    assert pace.implicated(step(joiner_lag=[0, 0, 0, 0, 90, 90, 90, 90])) == "joiner"
    assert pace.implicated(step(trainer_backlog=[0, 0, 0, 0, 900, 900, 900, 900])) == "trainer"
    assert pace.implicated(step(freshness_s=[7.0])) == "trainer"
    assert pace.implicated(step(freshness_s=[])) == "trainer"
    assert pace.implicated(step(requests=150)) == "serving"
    assert pace.implicated(step(impressions_dropped=3.0, joiner_lag=[0, 0, 0, 0, 90, 90, 90, 90])) == "serving"
    # Several missed: the one furthest over (the joiner 3x over its second, the trainer 1.5x).
    both = step(joiner_lag=[0, 0, 0, 0, 90, 90, 90, 90], trainer_backlog=[0, 0, 0, 0, 900, 900, 900, 900])
    assert pace.implicated(both) == "joiner"


# --------------------------------------------------------------------------- stages


def test_bare_impression_templates_are_every_events_message_but_actions() -> None:
    def stored(msg_id: str) -> StoredMessage:
        return StoredMessage(1, "events.0", {MSG_ID_HEADER: msg_id}, b"x")

    assert stages.is_impression(stored(impression_message_id("r1", "42")))
    assert not stages.is_impression(stored(action_message_id("r1", "42", "click")))
    assert stages.is_impression(stored("something/else"))  # a format of a later release: not an action


def test_a_joiner_round_counts_only_if_busy_to_its_end_and_without_a_restart() -> None:
    def round_(busy: bool, restarts: float) -> stages.JoinerRound:
        return stages.JoinerRound(1.0, 5_000.0, 0.0, busy, restarts, restarts)

    assert round_(busy=True, restarts=0).counts
    assert not round_(busy=False, restarts=0).counts
    assert not round_(busy=True, restarts=1).counts


def test_the_quick_run_is_shorter_in_every_part() -> None:
    quick, full = capacity.QUICK, capacity.FULL
    assert quick.step_seconds < full.step_seconds and quick.max_steps < full.max_steps
    assert quick.stage_seconds < full.stage_seconds and quick.drain_seconds < full.drain_seconds
