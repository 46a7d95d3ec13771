"""The join of one partition: semantics, a call's impressions expanded, sampling, event time
only, bad events refused by the event alone. (Restarts: test_join_restart.)"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.join_events import action, dislike, event_streams, feed, impression, impressions
from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.joiner.config import JoinerConfig, keeps_negative
from monolith.joiner.window import Emitted, PartitionJoin, _Deadlines
from monolith.streams.events import expand_impressions

WINDOW, LATENESS = 100.0, 10.0


def config(**overrides: object) -> JoinerConfig:
    return JoinerConfig(window=WINDOW, lateness=LATENESS, **overrides)


def keys(emitted: list[Emitted]) -> list[tuple[str, float]]:
    return [(e.sample.request_id, e.sample.label) for e in emitted]


def test_a_positive_action_emits_its_sample_at_once_with_the_impressions_features() -> None:
    join = PartitionJoin(config())
    assert feed(join, [impression("r1", 1000.0)]) == []
    [emitted] = join.add(2, action("r1", 1001.0))
    sample = emitted.sample
    assert (sample.request_id, sample.item_id, sample.label, sample.sample_rate) == ("r1", "i", 1.0, 1.0)
    assert sample.event_time == 1000.0 and sample.model_version == 3
    assert list(sample.features["genres"].values) == ["Comedy", "Drama"]
    assert (emitted.src_seq, emitted.win_seq) == (2, 1)


def test_an_action_before_its_impression_waits_for_it() -> None:
    join = PartitionJoin(config())
    assert join.add(1, action("r1", 1000.0)) == []
    [emitted] = join.add(2, impression("r1", 999.0))
    assert emitted.sample.label == 1.0 and emitted.win_seq == 1
    assert join.counts["early_actions"] == 1


def test_an_impression_without_a_positive_becomes_a_negative_when_the_watermark_passes_its_window() -> None:
    join = PartitionJoin(config())
    feed(join, [impression("r1", 1000.0), action("r1", 1001.0, label=0.0)])
    # Watermark = newest time - lateness; the window closes once it passes 1000 + 100.
    assert join.add(3, impression("r2", 1000.0 + WINDOW + LATENESS)) == []
    [negative] = join.add(4, impression("r3", 1000.0 + WINDOW + LATENESS + 1))
    assert (negative.sample.request_id, negative.sample.label, negative.sample.sample_rate) == ("r1", 0.0, 1.0)
    assert negative.src_seq == 4


def test_late_duplicate_and_orphan_actions_emit_nothing_and_are_counted() -> None:
    join = PartitionJoin(config())
    emitted = feed(join, [impression("r1", 1000.0), action("r1", 1001.0), action("r1", 1002.0), impression("r1", 1003.0)])
    assert keys(emitted) == [("r1", 1.0)]
    assert join.counts["duplicate_actions"] == 1 and join.counts["duplicate_impressions"] == 1
    # r2's action never meets an impression; r1's window closes; then a late action for r1.
    emitted = feed(join, [action("r2", 1010.0), impression("x", 1200.0), action("r1", 1201.0)], first_seq=5)
    assert emitted == []
    assert join.counts["orphan_actions"] == 1
    assert join.counts["late_actions"] == 1


def test_an_impression_after_its_action_gave_up_waiting_is_joined_late() -> None:
    join = PartitionJoin(config())
    feed(join, [action("r1", 1000.0), impression("x", 1000.0 + WINDOW + LATENESS + 1)])
    assert join.counts["orphan_actions"] == 1
    [emitted] = join.add(3, impression("r1", 1002.0))
    assert (emitted.sample.request_id, emitted.sample.label, emitted.win_seq) == ("r1", 1.0, 1)
    assert join.counts["late_impressions"] == 1


def test_an_explicit_negative_decides_its_key_at_once_and_closes_it() -> None:
    join = PartitionJoin(config())
    feed(join, [impression("r1", 1000.0)])
    [negative] = join.add(2, dislike("r1", 1001.0))
    assert (negative.sample.request_id, negative.sample.label, negative.sample.sample_rate) == ("r1", 0.0, 1.0)
    assert (negative.src_seq, negative.win_seq) == (2, 1)
    assert negative.sample.event_time == 1000.0 and list(negative.sample.features["genres"].values) == ["Comedy", "Drama"]
    # Closed: the window passing emits nothing more, a later positive is late.
    assert feed(join, [action("r1", 1002.0), impression("x", 5000.0)], first_seq=3) == []
    assert join.counts["negative_actions"] == 1 and join.counts["late_actions"] == 1


def test_an_explicit_negative_before_its_impression_is_decided_when_the_impression_comes() -> None:
    join = PartitionJoin(config())
    assert join.add(1, dislike("r1", 1000.0)) == []
    [negative] = join.add(2, impression("r1", 999.0))
    assert (negative.sample.label, negative.src_seq, negative.win_seq) == (0.0, 2, 1)
    assert join.counts["early_actions"] == 1


def test_the_first_decision_stands_and_duplicates_are_counted() -> None:
    # A positive, then a dislike: the positive stands (the window is still open).
    join = PartitionJoin(config())
    emitted = feed(join, [impression("r1", 1000.0), action("r1", 1001.0), dislike("r1", 1002.0)])
    assert keys(emitted) == [("r1", 1.0)] and join.counts["conflicting_actions"] == 1
    # A dislike before the impression, then a positive before it too: the dislike stands.
    join = PartitionJoin(config())
    emitted = feed(join, [dislike("r2", 1000.0), action("r2", 1001.0), dislike("r2", 1001.0), impression("r2", 1002.0)])
    assert keys(emitted) == [("r2", 0.0)]
    assert join.counts["conflicting_actions"] == 1 and join.counts["duplicate_actions"] == 1
    # A dislike after the window closed (the impression became a negative already): late.
    join = PartitionJoin(config())
    closes = 1000.0 + WINDOW + LATENESS + 1  # past r3's window, before it is forgotten
    emitted = feed(join, [impression("r3", 1000.0), impression("x", closes), dislike("r3", closes)])
    assert keys(emitted) == [("r3", 0.0)] and join.counts["late_actions"] == 1


def test_explicit_negatives_are_sampled_as_any_negative() -> None:
    rate = 0.3
    join = PartitionJoin(config(negative_sample_rate=rate))
    ids = [f"r{i}" for i in range(200)]
    events = [e for r in ids for e in (impression(r, 1000.0), dislike(r, 1000.5))]
    kept = {e.sample.request_id for e in feed(join, events)}
    assert kept == {r for r in ids if keeps_negative(r, "i", rate)}
    assert join.counts["negatives_sampled_out"] == len(ids) - len(kept)


def test_negative_kinds_must_be_action_kinds() -> None:
    with pytest.raises(ValueError, match="negative_kinds: skip not among action_kinds"):
        config(action_kinds=("click",), negative_kinds=("skip",))


def test_negatives_are_kept_by_a_stable_hash_and_carry_the_rate() -> None:
    rate = 0.3
    join = PartitionJoin(config(negative_sample_rate=rate))
    ids = [f"r{i}" for i in range(400)]
    emitted = feed(join, [impression(r, 1000.0) for r in ids] + [impression("end", 5000.0)])
    kept = {e.sample.request_id for e in emitted}
    assert kept == {r for r in ids if keeps_negative(r, "i", rate)}
    assert 0.2 < len(kept) / len(ids) < 0.4
    assert all(e.sample.sample_rate == pytest.approx(rate) for e in emitted)
    assert join.counts["negatives_sampled_out"] == len(ids) - len(kept)


def test_windows_close_on_event_time_alone_however_fast_events_arrive() -> None:
    """An accelerated replay is the same sequence of events: the same samples at the same events."""
    events = [impression(f"r{i}", 1000.0 + 7 * i) for i in range(60)] + [action(f"r{i}", 1003.0 + 7 * i) for i in range(0, 60, 3)]
    events.sort(key=lambda e: getattr(e, e.WhichOneof("event")).event_time)
    first = feed(PartitionJoin(config()), events)
    second = feed(PartitionJoin(config()), events)
    assert [(e.position, e.sample.request_id, e.sample.label) for e in first] == [
        (e.position, e.sample.request_id, e.sample.label) for e in second
    ]
    # Nothing closes before the watermark (newest - lateness) passes time + window.
    for e in first:
        if e.sample.label == 0.0:
            src_time = getattr(events[e.src_seq - 1], events[e.src_seq - 1].WhichOneof("event")).event_time
            assert src_time - LATENESS > e.sample.event_time + WINDOW


def test_bad_events_are_refused_and_change_nothing() -> None:
    join = PartitionJoin(config())
    with pytest.raises(ValueError, match="holds no impression"):
        join.add(1, pb.Event())
    with pytest.raises(ValueError, match="not finite"):
        join.add(2, impression("r1", math.nan))
    with pytest.raises(ValueError, match="not after"):
        join.add(2, impression("r1", 1.0))
    assert join.remembered == 0 and join.newest_time == -math.inf


HOSTILE = ["r\r\nNats-Msg-Id: x", "r\n", "r\x00", "r" * 65536, "", "r\x85"]


@pytest.mark.parametrize("bad", HOSTILE, ids=["crlf", "lf", "nul", "64KiB", "empty", "c1"])
def test_events_whose_ids_break_the_id_rule_are_refused_and_change_nothing(bad: str) -> None:
    join = PartitionJoin(config())
    feed(join, [impression("r1", 1000.0)])
    before = join.snapshot()
    for seq, event in enumerate([impression(bad, 1001.0), impression("r2", 1001.0, item=bad),
                                 action(bad, 1001.0), action("r1", 1001.0, item=bad)], start=2):  # fmt: skip
        with pytest.raises(ValueError, match=r"(request_id|item_id): "):
            join.add(seq, event)
    assert join.remembered == 1 and join.newest_time == before.newest_time and join.counts["actions"] == 0


def test_a_snapshot_key_whose_ids_break_the_rule_is_not_restored() -> None:
    """A snapshot of a release that took any id: such a key could never be published."""
    join = PartitionJoin(config())
    feed(join, [impression("r1", 1000.0), impression("r2", 1000.0)])
    state = join.snapshot()
    state.keys[1].request_id = "r2\r\n"
    restored = PartitionJoin.restore(config(), state)
    assert restored.remembered == 1
    emitted = feed(restored, [impression("end", 5000.0)], first_seq=3)
    assert [e.sample.request_id for e in emitted] == ["r1"]


@settings(max_examples=200, deadline=None)
@given(events=event_streams(), hostile=st.lists(st.tuples(st.integers(0, 60), st.sampled_from(HOSTILE)), max_size=8))
def test_hostile_events_are_skipped_by_the_event_alone(events: list[pb.Event], hostile: list[tuple[int, str]]) -> None:
    """Events with bad ids among clean ones: the samples are those of the clean events
    alone at the same sequences, so a restart that re-reads them decides the same."""
    mixed: list[tuple[pb.Event, bool]] = [(e, True) for e in events]
    for at, bad in sorted(hostile, reverse=True):
        mixed.insert(min(at, len(mixed)), (impression(bad, 1000.0) if at % 2 else action("r1", 1000.0, item=bad), False))
    with_hostile, clean_only = PartitionJoin(config()), PartitionJoin(config())
    got: list[Emitted] = []
    want: list[Emitted] = []
    for seq, (event, clean) in enumerate(mixed, start=1):
        try:
            got.extend(with_hostile.add(seq, event))
        except ValueError:
            assert not clean
        if clean:
            want.extend(clean_only.add(seq, event))
    assert [(e.position, e.sample) for e in got] == [(e.position, e.sample) for e in want]
    expected = clean_only.snapshot()
    expected.last_seq = len(mixed)  # a refused event is read all the same
    assert with_hostile.snapshot() == expected


# ------------------------------------------------------------ a call's impressions


def features(sample: pb.Sample | pb.Impression) -> dict[str, list[str]]:
    return {name: list(values.values) for name, values in sample.features.items()}


def test_an_impressions_message_is_one_impression_per_candidate_the_shared_features_merged() -> None:
    event = impressions("r1", 1000.0, ["a", "b"], times=[None, 990.0])
    event.impressions.candidates[1].features.pop("genres")  # b keeps the shared genres
    a, b = expand_impressions(event.impressions)
    assert (a.request_id, a.item_id, a.event_time, a.model_version, a.score) == ("r1", "a", 1000.0, 3, 0.0)
    assert features(a) == {"user_id": ["u-r1"], "genres": ["Comedy", "a"], "movie_id": ["a"]}  # its own win
    assert (b.item_id, b.event_time, b.score) == ("b", 990.0, 0.25)
    assert features(b) == {"user_id": ["u-r1"], "genres": ["shared"], "movie_id": ["b"]}

    join = PartitionJoin(config())
    assert join.add(1, event) == []
    [sample_b] = join.add(2, action("r1", 1001.0, item="b"))
    assert (sample_b.sample.item_id, sample_b.sample.event_time, sample_b.sample.model_version) == ("b", 990.0, 3)
    assert features(sample_b.sample) == features(b)
    assert sample_b.position == (2, 1, 1)
    assert join.counts["impressions"] == 2


def test_the_samples_of_one_event_come_in_the_order_of_their_keys_first_positions() -> None:
    join = PartitionJoin(config())
    feed(join, [action("r1", 1000.0, item="c"), impressions("r1", 1000.0, ["a", "b", "c"]), impression("r2", 1000.0)])
    # The action on c came first: c is joined at once, at its key's position (1, 0).
    assert join.counts["positives"] == 1
    negatives = join.add(4, impression("end", 5000.0))
    assert [(e.sample.request_id, e.sample.item_id, e.position) for e in negatives] == [
        ("r1", "a", (4, 2, 0)), ("r1", "b", (4, 2, 1)), ("r2", "i", (4, 3, 0)),
    ]  # fmt: skip


def test_a_candidate_repeated_or_already_shown_is_a_duplicate_impression() -> None:
    join = PartitionJoin(config())
    feed(join, [impression("r1", 1000.0, item="a"), impressions("r1", 1000.0, ["b", "a", "b"])])
    assert join.counts["impressions"] == 4 and join.counts["duplicate_impressions"] == 2
    emitted = join.add(3, impression("end", 5000.0))
    assert [(e.sample.item_id, e.position) for e in emitted] == [("a", (3, 1, 0)), ("b", (3, 2, 0))]
    # The repeat of b was not taken: b's features are its first candidate's.
    assert features(emitted[1].sample)["movie_id"] == ["b"]


def bad_impressions() -> list[tuple[str, pb.Event]]:
    nan_time = impressions("r2", math.nan, ["a"])
    candidate_inf = impressions("r2", 1000.0, ["a", "b"], times=[None, math.inf])
    return [
        ("no candidates", impressions("r2", 1000.0, [])),
        ("request_id: is required", impressions("", 1000.0, ["a"])),
        ("request_id: control characters", impressions("r\n", 1000.0, ["a"])),
        (r"candidates\[1\].item_id: is required", impressions("r2", 1000.0, ["a", ""])),
        (r"candidates\[2\].item_id: control characters", impressions("r2", 1000.0, ["a", "b", "c\r\n"])),
        (r"candidates\[0\].item_id: 300 bytes", impressions("r2", 1000.0, ["x" * 300])),
        ("not finite", nan_time),
        ("not finite", candidate_inf),
    ]


@pytest.mark.parametrize("match,event", bad_impressions(), ids=[m for m, _ in bad_impressions()])
def test_an_impressions_message_with_a_bad_part_is_refused_as_a_whole(match: str, event: pb.Event) -> None:
    join = PartitionJoin(config())
    feed(join, [impression("r1", 1000.0)])
    before = join.snapshot()
    with pytest.raises(ValueError, match=match):
        join.add(2, event)
    after = join.snapshot()
    after.last_seq = before.last_seq
    assert after == before and join.counts["impressions"] == 1


def test_a_decided_or_closed_key_keeps_no_impression_but_still_knows_it_had_one() -> None:
    join = PartitionJoin(config())
    feed(join, [impressions("r1", 1000.0, ["a", "b", "c"]), action("r1", 1001.0, item="a"),
                dislike("r1", 1001.0, item="b")])  # fmt: skip
    state = join.snapshot()
    held = {k.item_id: (k.source_seq, k.source_idx) for k in state.keys}
    assert held == {"a": (0, 0), "b": (0, 0), "c": (1, 2)}  # c still waits for an action, in call 1
    assert [c.seq for c in state.calls] == [1] and not any(k.HasField("impression") for k in state.keys)
    assert all(k.shown for k in join.snapshot().keys)
    assert join.open_windows == 2  # a (decided, its window still open) and c; b closed
    closes = 1000.0 + WINDOW + LATENESS + 1  # past the windows, before the keys are forgotten
    [negative] = join.add(4, impression("x", closes))
    assert negative.sample.item_id == "c" and features(negative.sample)["movie_id"] == ["c"]
    state = join.snapshot()
    assert not any(k.source_seq for k in state.keys if k.request_id == "r1") and not state.calls
    # Remembered without their impressions: a repeat is a duplicate, an action is late.
    assert feed(join, [impression("r1", closes, item="c"), action("r1", closes, item="c")], first_seq=5) == []
    assert join.counts["duplicate_impressions"] == 1 and join.counts["late_actions"] == 1
    assert join.open_windows == 1  # x


@settings(max_examples=150, deadline=None)
@given(events=event_streams())
def test_open_windows_counts_the_keys_not_closed(events: list[pb.Event]) -> None:
    join = PartitionJoin(config())
    for seq, event in enumerate(events, start=1):
        join.add(seq, event)
        keys_ = join.snapshot().keys
        assert join.open_windows == sum(1 for k in keys_ if not k.closed)
        assert all(not k.HasField("impression") for k in keys_ if k.closed or k.emitted)


def test_a_calls_sample_is_its_candidates_impression_with_the_label_whatever_the_name_clashes() -> None:
    """Samples of a call are built from bytes (shared features, then the candidate's own);
    parsed, each is what the candidate's expanded impression makes, its own features winning."""
    call = pb.Impressions(request_id="r1", event_time=1000.0, model_version=7)
    call.shared_features["user_id"].values.append("u1")
    call.shared_features["movie_id"].values.append("shared-loses")
    for j, own_time in enumerate([None, 999.5]):
        candidate = call.candidates.add(item_id=f"m{j}", score=0.25 * j)
        candidate.features["movie_id"].values.append(f"m{j}")
        candidate.features["genres"].values.extend(["Drama", "Comedy"][: j + 1])
        if own_time is not None:
            candidate.event_time = own_time
    join = PartitionJoin(config())
    emitted = feed(join, [pb.Event(impressions=call), action("r1", 1001.0, item="m1")])
    emitted += join.add(3, impression("x", 1000.0 + WINDOW + LATENESS + 1))
    by_item = {e.item_id: e for e in emitted}
    for impression_ in expand_impressions(call):
        got = by_item[impression_.item_id]
        expected = pb.Sample(request_id="r1", item_id=impression_.item_id, label=got.label, sample_rate=1.0,
                             event_time=impression_.event_time, model_version=7)  # fmt: skip
        expected.features.MergeFrom(impression_.features)
        assert got.sample == expected
        assert (got.request_id, got.label) == ("r1", 1.0 if impression_.item_id == "m1" else 0.0)
    assert list(by_item["m0"].sample.features["movie_id"].values) == ["m0"]


def test_a_candidate_has_no_field_a_sample_would_take_for_a_feature() -> None:
    """A call's samples serialize a candidate with every field but `features` cleared (see
    window._CallSamples): a field added to `Candidate` must be cleared there too."""
    assert {f.name for f in pb.Candidate.DESCRIPTOR.fields} == {"item_id", "score", "features", "event_time"}
    assert pb.Candidate.DESCRIPTOR.fields_by_name["features"].number == pb.Sample.DESCRIPTOR.fields_by_name["features"].number


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 100), st.floats(0, 100)), max_size=60))
def test_deadlines_come_out_in_time_order_whatever_order_they_went_in(steps: list[tuple[bool, float, float]]) -> None:
    """Pushes (in time order or not) and takes (before a time) interleaved, against a sorted list."""
    deadlines, model = _Deadlines(), []
    for n, (push, time, before) in enumerate(steps):
        if push:
            deadlines.push((time, n, ("r", str(n))))
            model.append(time)
        else:
            taken = []
            while (due := deadlines.pop_before(before)) is not None:
                taken.append(due[0])
            assert taken == sorted(t for t in model if t < before)
            model = [t for t in model if t >= before]
        assert len(deadlines) == len(model)


def test_a_sample_decided_carries_its_served_score_sampling_rate_and_label_delay() -> None:
    join = PartitionJoin(config(negative_sample_rate=1.0))
    feed(join, [impressions("r1", 1000.0, ["a", "b", "c"], times=[None, 1004.0])])
    [clicked] = join.add(2, action("r1", 1030.0, item="b"))  # shown at its own time, 1004
    assert (clicked.score, clicked.sample_rate, clicked.label_delay) == (0.25, 1.0, 26.0)
    [early] = feed(join, [action("r2", 1040.0), impression("r2", 1041.0)], first_seq=3)
    assert (early.score, early.label_delay) == (0.5, 0.0)  # the action came first: no wait for the label
    negatives = join.add(5, impression("x", 1004.0 + WINDOW + LATENESS + 1))
    assert sorted((e.item_id, e.score, e.sample_rate) for e in negatives) == [("a", 0.0, 1.0), ("c", 0.5, 1.0)]
    assert all(math.isnan(e.label_delay) for e in negatives)


def test_a_kept_negative_carries_the_rate_it_was_kept_at() -> None:
    join = PartitionJoin(config(negative_sample_rate=0.5))
    items = [f"m{k}" for k in range(40)]
    feed(join, [impressions("r1", 1000.0, items)])
    negatives = join.add(2, impression("x", 1000.0 + WINDOW + LATENESS + 1))
    assert negatives and all(e.sample_rate == 0.5 == e.sample.sample_rate and e.label == 0.0 for e in negatives)
