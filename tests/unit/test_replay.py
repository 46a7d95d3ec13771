"""The replay's pieces that need no stack: data order and raw values, pacing, AUC
bookkeeping, sample reconciliation, the freshness probe's logic, the summary and the plot."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from helpers.waiting import wait_for
from monolith.joiner.config import keeps_negative
from monolith.model.config import default_config_path, load_model_config
from monolith.harness.replay.bookkeeping import (
    ScoreBook,
    auc_of_scored,
    expected_samples,
    percentile,
    reconcile,
    rolling_auc,
)
from monolith.harness.replay.pacing import Pacer, WindowGate
from monolith.harness.replay.probe import FreshnessProbe
from monolith.harness.replay.report import plot_rolling_auc, summary_table
from monolith.harness.replay.samples import ImpressionWatch, closing_time, watermark_request_ids
from monolith.harness.replay.service import json_ready
from monolith.harness.replay.traffic import load_replay_data
from monolith.serving.model import ServingModel
from monolith.streams.config import StreamsConfig, partition_of
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.model.quality import auc

# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def replay_data():
    return load_replay_data(limit=5000)


def test_replay_is_the_last_fifth_in_time_order(replay_data) -> None:
    assert len(replay_data.train) == 4000 and len(replay_data) == 1000
    assert np.all(np.diff(replay_data.data.timestamps) >= 0)
    assert replay_data.train.timestamps.max() <= replay_data.stream.timestamps.min()
    assert replay_data.event_time(0) == float(replay_data.stream.timestamps[0])


def test_raw_values_hash_to_the_examples_ids(replay_data) -> None:
    """What the replay sends, hashed as serving hashes it, is exactly what was trained on."""
    config = load_model_config(default_config_path())
    model = ServingModel(config, LocalEmbeddings(config.tables()), LocalDense(config.model.optimizer))
    indices = range(0, len(replay_data), 7)
    features = replay_data.features(indices)
    width = max(len(g) for g in features["genres"])
    inputs = {name: np.array(values, dtype=object if name != "user_id" and name != "movie_id" else np.int64)
              for name, values in features.items() if name != "genres"}  # fmt: skip
    inputs["genres"] = np.array([g + [""] * (width - len(g)) for g in features["genres"]], dtype=object)
    ids, row_splits, batch = model.parse(inputs)
    assert batch == len(indices)
    for name in ids:
        rows = [replay_data.stream.slice(i, i + 1).ids[name] for i in indices]
        np.testing.assert_array_equal(ids[name], np.concatenate(rows), err_msg=name)
        np.testing.assert_array_equal(np.diff(row_splits[name]), [len(r) for r in rows], err_msg=name)
    assert replay_data.item_id(3) == str(replay_data.movie(3)["movie_id"])


# ---------------------------------------------------------------- pacing


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return False


def test_pacer_releases_event_i_at_start_plus_i_over_speed() -> None:
    clock = FakeClock()
    pacer = Pacer(50.0, clock=clock, wait=clock.wait)
    for i in range(5):
        assert pacer.wait_for(i)
        assert clock.now == pytest.approx(100.0 + i / 50.0)
    assert pacer.due(100) == pytest.approx(102.0)


def test_pacer_catches_up_after_a_slow_event() -> None:
    clock = FakeClock()
    pacer = Pacer(10.0, clock=clock, wait=clock.wait)
    assert pacer.wait_for(0)
    clock.now += 0.35  # event 0 took 350 ms: events 1-3 are due already
    clock.waits.clear()
    for i in (1, 2, 3):
        assert pacer.wait_for(i)
    assert clock.waits == []
    assert pacer.behind(1) == pytest.approx(0.25)
    assert pacer.wait_for(4) and clock.now == pytest.approx(100.4)


def test_unpaced_and_stopped() -> None:
    clock = FakeClock()
    assert Pacer(0.0, clock=clock, wait=clock.wait).due(10_000) == 100.0
    assert Pacer(math.inf, clock=clock, wait=clock.wait).unpaced
    stop = threading.Event()
    stop.set()
    assert not Pacer(1.0, clock=clock, stop=stop).wait_for(5)
    with pytest.raises(ValueError):
        Pacer(-1.0)


def test_window_gate_holds_an_event_that_could_close_an_in_flight_window() -> None:
    gate = WindowGate(horizon=3660.0)
    assert gate.enter(1000.0, partition=3)
    assert gate.enter(4660.0, partition=3)  # exactly window + lateness newer: cannot close it yet
    assert gate.enter(9000.0, partition=5)  # another partition: another watermark
    assert gate.blocked_by(4661.0, 3) == [1000.0] and gate.blocked_by(4661.0, 5) == []
    entered = threading.Event()

    def later() -> None:
        gate.enter(4661.0, partition=3)
        entered.set()

    thread = threading.Thread(target=later)
    thread.start()
    # Held back while 1000 is in flight (an enter that went through at once fails the assert below, not a timeout).
    wait_for(lambda: gate.waiting or entered.is_set(), "the later enter to be held back", timeout=10.0, interval=0.01)
    assert gate.waiting == 1 and not entered.is_set()
    gate.leave(1000.0, partition=3)
    assert entered.wait(10.0)
    thread.join()
    assert gate.waits == 1 and gate.waiting == 0
    assert gate.blocked_by(10_000.0, 3) == [4660.0, 4661.0] and gate.newest == 9000.0


def test_window_gate_enter_newest_takes_the_newest_time_and_waits_like_enter() -> None:
    gate = WindowGate(horizon=10.0)
    assert gate.enter_newest(0) is None  # nothing sent yet: no "now"
    gate.enter(100.0, 0)
    gate.enter(200.0, 1)
    done = []
    thread = threading.Thread(target=lambda: done.append(gate.enter_newest(0)))
    thread.start()  # 200 would close the window of 100, in flight in partition 0
    wait_for(lambda: gate.waiting or done, "enter_newest to be held back or done", timeout=10.0, interval=0.01)
    gate.leave(100.0, 0)
    thread.join(10.0)
    assert done == [200.0] and gate.blocked_by(211.0, 0) == [200.0]


def test_window_gate_wait_ends_when_stopped() -> None:
    stop = threading.Event()
    gate = WindowGate(horizon=10.0, stop=stop)
    assert gate.enter(0.0, 0)
    stop.set()
    assert not gate.enter(100.0, 0)
    assert gate.enter(100.0, 1)  # nothing to wait for there


# ---------------------------------------------------------------- AUC bookkeeping


def test_score_book_auc_covers_only_scored_events() -> None:
    labels = np.array([1, 0, 1, 0, 1, 0], np.float32)
    book = ScoreBook(labels)
    assert math.isnan(book.auc())
    book.record(0, 0.9)
    book.record(1, 0.1)
    book.fail(2)
    book.record(3, 0.8)  # ranks above positive... none yet: event 4 missing
    assert book.auc() == pytest.approx(auc(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.8])))
    assert book.recorded == 3 and book.failed == 1


def test_rolling_auc_windows_end_every_step_and_at_the_end() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000).astype(np.float32)
    scores = np.where(np.arange(1000) < 500, rng.random(1000), labels + rng.random(1000) * 0.1)
    ends, values = rolling_auc(labels, scores, window=200, step=100)
    assert list(ends) == list(range(200, 1001, 100))
    for end, value in zip(ends, values):
        assert value == pytest.approx(auc(labels[end - 200 : end], scores[end - 200 : end]))
    assert values[-1] == 1.0 and abs(values[0] - 0.5) < 0.15
    ends, _ = rolling_auc(labels[:250], scores[:250], window=200, step=100)
    assert list(ends) == [200, 250]  # the last events always end a window


def test_rolling_auc_skips_unscored_events_and_short_input() -> None:
    labels = np.array([1, 0, 1, 0], np.float32)
    scores = np.array([0.9, np.nan, 0.8, 0.1])
    ends, values = rolling_auc(labels, scores, window=10, step=1)
    assert list(ends) == [4] and values[0] == auc_of_scored(labels, scores) == 1.0
    assert rolling_auc(np.zeros(0), np.zeros(0), 5, 1)[0].shape == (0,)


def test_percentiles() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(range(101), 99) == pytest.approx(99.0)
    assert math.isnan(percentile([], 50))


# ---------------------------------------------------------------- samples


def test_reconcile_counts_lost_duplicated_unexpected_and_mislabeled() -> None:
    expected = {("r1", "10"): 1.0, ("r2", "20"): 0.0, ("r3", "30"): 0.0, ("r4", "40"): 1.0}
    samples = [
        (("r1", "10"), 1.0),
        (("r2", "20"), 0.0),
        (("r1", "10"), 1.0),  # duplicate
        (("r4", "40"), 0.0),  # wrong label
        (("r9", "90"), 0.0),  # not expected
    ]
    counts = reconcile(expected, samples)
    assert (counts.expected, counts.joined, counts.lost) == (4, 3, 1)
    assert (counts.duplicated, counts.unexpected, counts.mislabeled) == (1, 1, 1)
    assert reconcile(expected, [(k, v) for k, v in expected.items()]).lost == 0


def test_expected_samples_follow_the_joiners_negative_sampling() -> None:
    impressions = [(f"req-{i}", str(i % 7), float(i % 3 == 0)) for i in range(2000)]
    assert len(expected_samples(impressions, 1.0)) == 2000
    kept = expected_samples(impressions, 0.25)
    positives = sum(1 for _, _, label in impressions if label == 1.0)
    negatives = [(r, i) for r, i, label in impressions if label == 0.0]
    assert sum(1 for v in kept.values() if v == 1.0) == positives  # positives are never sampled away
    assert {k for k, v in kept.items() if v == 0.0} == {k for k in negatives if keeps_negative(*k, 0.25)}
    assert 0.18 < sum(1 for v in kept.values() if v == 0.0) / len(negatives) < 0.32


def test_one_watermark_request_per_partition_closing_every_window() -> None:
    ids = watermark_request_ids("replay-ab12-wm-", 8)
    assert [partition_of(r, 8) for r in ids] == list(range(8))
    assert len(set(ids)) == 8 and all(r.startswith("replay-ab12-wm-") for r in ids)
    # The joiner closes an impression at t once newest - lateness > t + window.
    last, window, lateness = 893_000_000.0, 3600.0, 60.0
    assert closing_time(last, window, lateness) - lateness > last + window


def test_impression_watch_runs_callbacks_once_the_impression_is_stored() -> None:
    clock = FakeClock()
    watch = ImpressionWatch(StreamsConfig(), "run-", timeout=10.0, clock=clock)
    ran: list[str] = []
    watch.after_stored("run-1", lambda: ran.append("a"))
    watch.after_stored("run-1", lambda: ran.append("b"))
    watch.after_stored("run-2", lambda: ran.append("c"))
    assert ran == []
    watch.stored("run-1")
    assert ran == ["a", "b"]
    watch.after_stored("run-1", lambda: ran.append("d"))  # already stored: at once
    assert ran == ["a", "b", "d"]
    clock.now += 9.0
    assert watch.expire() == 0
    clock.now += 2.0  # run-2's impression never came (dropped by serving, say)
    assert watch.expire() == 1 and ran[-1] == "c" and watch.unseen == 1
    watch.after_stored("run-3", lambda: ran.append("e"))
    watch.close()  # what still waits runs on close
    assert ran[-1] == "e"


# ---------------------------------------------------------------- freshness probe


class FakeStack:
    """Scores users by whether the probe's rows 'arrived' (after `delay` fake seconds)."""

    def __init__(self, clock: FakeClock, delay: float | None) -> None:
        self.clock = clock
        self.delay = delay
        self.trained: dict[int, float] = {}  # probe user -> clock reading at which it changes
        self.calls: list[tuple[dict, str | None, float | None]] = []
        self.reports: list[tuple[str, str, float]] = []

    def predict(self, features, request_id, event_time):
        self.calls.append((dict(features), request_id, event_time))
        users = features["user_id"]
        return np.array([0.7 if self.clock.now >= self.trained.get(u, math.inf) else 0.5 for u in users])

    def report(self, request_id, item_id, event_time):
        self.reports.append((request_id, item_id, event_time))
        probe_user = self.calls[-1][0]["user_id"][0]
        if self.delay is not None:
            self.trained[probe_user] = self.clock.now + self.delay


def _stored_at_once(request_id: str, callback) -> None:
    callback()  # the impression is on the stream as soon as Predict answers


def _gate(now: float | None = 880_000_000.0) -> WindowGate:
    """The replay's gate after it sent an event at `now` (None: nothing sent yet)."""
    gate = WindowGate(horizon=20.0)
    if now is not None:
        gate.enter(now, 0)
        gate.leave(now, 0)
    return gate


def _probe(clock: FakeClock, stack: FakeStack, gate: WindowGate | None = None) -> FreshnessProbe:
    return FreshnessProbe(stack.predict, stack.report, gate or _gate(), 8, _stored_at_once,
                          user={"user_id": 1, "age": "25-34", "gender": "M", "occupation": "writer", "zip": "554"},
                          movie={"movie_id": 50, "genres": ["Action"]}, first_user_id=10**9,
                          request_prefix="run-probe-", timeout=15.0, poll=0.05, clock=clock)  # fmt: skip


def test_probe_measures_report_to_changed_score(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    stack = FakeStack(clock, delay=1.2)
    probe = _probe(clock, stack)
    monkeypatch.setattr(probe._stop, "wait", clock.wait)
    result = probe.probe_once()
    assert result is not None and not result.missed
    assert 1.2 <= result.seconds <= 1.2 + 0.05 + 1e-9
    # First a pair without request_id, then the impression (probe user only, with event
    # time), then the action; the polls again carry no request_id.
    first, impression = stack.calls[0], stack.calls[1]
    assert first[1] is None and first[0]["user_id"] == [10**9, 10**9 + 1]
    assert impression[1] == "run-probe-0" and impression[2] == 880_000_000.0
    assert impression[0]["user_id"] == [10**9] and impression[0]["age"] == ["25-34"]
    assert stack.reports == [("run-probe-0", "50", 880_000_000.0)]
    assert all(call[1] is None for call in stack.calls[2:])
    assert probe.impressions() == [("run-probe-0", "50", 1.0)] and probe.actions() == 1
    # The next probe uses two other fresh users.
    probe.probe_once()
    assert stack.calls[-1][0]["user_id"] == [10**9 + 2, 10**9 + 3]


def test_probe_times_out_as_a_miss_and_skips_before_the_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    stack = FakeStack(clock, delay=None)  # the rows never arrive
    probe = _probe(clock, stack)
    monkeypatch.setattr(probe._stop, "wait", clock.wait)
    result = probe.probe_once()
    assert result is not None and result.missed
    probe._results.append(result)
    assert probe.seconds() == [15.0]
    assert _probe(clock, stack, gate=_gate(None)).probe_once() is None


def test_probe_takes_the_newest_event_time_and_holds_later_events_until_its_action(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    stack = FakeStack(clock, delay=0.5)
    gate = _gate(880_000_000.0)
    gate.enter(880_000_005.0, 1)  # the replay's newest event so far, done by the time the probe runs
    gate.leave(880_000_005.0, 1)
    seen_in_flight = []
    report = stack.report
    partition = partition_of("p-0", 8)

    def reporting(request_id, item_id, event_time):
        # While the probe reports, an event of its partition far ahead of it would have to wait.
        seen_in_flight.append(gate.blocked_by(event_time + 21.0, partition))
        report(request_id, item_id, event_time)

    probe = FreshnessProbe(stack.predict, reporting, gate, 8, _stored_at_once, user={"user_id": 1, "age": "25-34"},
                           movie={"movie_id": 50, "genres": ["Action"]}, first_user_id=10**9,
                           request_prefix="p-", clock=clock)  # fmt: skip
    monkeypatch.setattr(probe._stop, "wait", clock.wait)
    assert probe.probe_once() is not None
    assert stack.reports == [("p-0", "50", 880_000_005.0)]
    assert seen_in_flight == [[880_000_005.0]]  # the probe itself was in flight
    assert gate.blocked_by(880_000_005.0 + 21.0, partition) == []  # and left


def test_probe_skips_users_that_already_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    stack = FakeStack(clock, delay=0.0)
    stack.trained[10**9] = 0.0  # the "fresh" probe user already has rows
    probe = _probe(clock, stack)
    assert probe.probe_once() is None and probe.skipped == 1 and stack.reports == []


# ---------------------------------------------------------------- summary, plot, a missing stack


def test_summary_table_and_json_leave_missing_figures_out() -> None:
    result = {"events": 20_000, "served_progressive_auc": 0.7512345, "frozen_auc": math.nan, "plot": "x.png"}
    table = summary_table(result)
    assert "20,000" in table and "0.7512" in table and "n/a" in table
    assert json_ready(result) == {"events": 20_000, "served_progressive_auc": 0.7512, "frozen_auc": None,
                                  "plot": "x.png"}  # fmt: skip


def test_plot_writes_a_png(tmp_path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 3000).astype(np.float32)
    served = labels * 0.3 + rng.random(3000)
    path = plot_rolling_auc(str(tmp_path / "sub" / "auc.png"), labels,
                            {"served": served, "frozen": rng.random(3000)})  # fmt: skip
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_missing_stack_and_up_without_a_data_dir(tmp_path, capsys) -> None:
    from monolith.cli import main

    assert main(["replay", "--stack", str(tmp_path / "stack.json")]) == 1
    assert "stack.json not found" in capsys.readouterr().err
    assert main(["replay", "--up"]) == 2
    assert "--up needs --data-dir" in capsys.readouterr().err
    assert main(["replay", "--up", "--data-dir", str(tmp_path), "--speed", "-1"]) == 2
