"""Restarting a partition's join: snapshots and deltas restore it exactly, the incremental
snapshot store survives a crash at any write, and a restart after any failure (a batch of
which any subset was not stored, a kill between batches) stores exactly the undisturbed
output on SAMPLES."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.join_events import action, event_streams, feed, impression, impressions
from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.joiner.config import JoinerConfig
from monolith.joiner.partition import StoredSamples, sample_message, sample_position
from monolith.joiner.snapshots import COMPACTION_RATIO, Snapshots
from monolith.joiner.window import Emitted, PartitionJoin
from monolith.streams.publish import Message

WINDOW, LATENESS = 100.0, 10.0


def config(**overrides: object) -> JoinerConfig:
    return JoinerConfig(window=WINDOW, lateness=LATENESS, **overrides)


def run(join: PartitionJoin, events: list[pb.Event]) -> list[Emitted]:
    """Feeds the events after the join's last one."""
    return feed(join, events[join.last_seq :], first_seq=join.last_seq + 1)


def test_a_snapshot_restores_every_key_and_the_clock() -> None:
    join = PartitionJoin(config())
    feed(join, [impression("r1", 1000.0), action("r2", 1001.0), impressions("r3", 1002.0, ["a", "b"]),
                action("r3", 1003.0, item="b")])  # fmt: skip
    restored = PartitionJoin.restore(config(), join.snapshot())
    assert restored.snapshot() == join.snapshot()
    assert (restored.last_seq, restored.newest_time, restored.open_windows) == (4, 1003.0, 4)
    assert [(k.request_id, k.item_id, k.first_seq, k.first_idx) for k in restored.snapshot().keys] == [
        ("r1", "i", 1, 0), ("r2", "i", 2, 0), ("r3", "a", 3, 0), ("r3", "b", 3, 1),
    ]  # fmt: skip


def test_a_snapshot_of_an_earlier_release_is_restored() -> None:
    """Earlier releases kept every key's impression and wrote no `shown`, `first_idx` or deltas."""
    join = PartitionJoin(config())
    feed(join, [impression("r1", 1000.0), action("r1", 1001.0), impression("r2", 1000.0), action("r3", 1000.0)])
    old = join.snapshot()
    for key in old.keys:
        key.shown = False
        if key.request_id == "r1":  # decided: this release dropped its impression, an earlier one kept it
            key.impression.CopyFrom(impression("r1", 1000.0).impression)
    restored = PartitionJoin.restore(config(), old)
    assert restored.snapshot() == join.snapshot()
    assert feed(restored, [impression("r1", 1002.0), action("r2", 1002.0)], first_seq=5)[0].sample.request_id == "r2"
    assert restored.counts["duplicate_impressions"] == 1


def test_a_call_is_saved_once_for_its_waiting_keys_and_restored_from_it() -> None:
    """The release before per-call state kept an expanded impression per candidate key."""
    join = PartitionJoin(config())
    feed(join, [impressions("r1", 1000.0, ["a", "b", "c"]), action("r1", 1001.0, item="b")])
    state = join.snapshot()
    assert [c.seq for c in state.calls] == [1] and pb.Impressions.FromString(state.calls[0].impressions).request_id == "r1"
    assert {k.item_id: (k.source_seq, k.source_idx) for k in state.keys} == {"a": (1, 0), "b": (0, 0), "c": (1, 2)}
    restored = PartitionJoin.restore(config(), state)
    closes = 1000.0 + WINDOW + LATENESS + 1
    expected = [(e.position, e.sample) for e in feed(join, [impression("x", closes)], first_seq=3)]
    assert [(e.position, e.sample) for e in feed(restored, [impression("x", closes)], first_seq=3)] == expected
    assert sorted(s.item_id for _, s in expected) == ["a", "c"]
    assert not join.snapshot().calls  # no key needs the call any more


def test_a_state_whose_key_points_at_a_call_not_saved_is_refused() -> None:
    join = PartitionJoin(config())
    feed(join, [impressions("r1", 1000.0, ["a", "b"])])
    state = join.snapshot()
    del state.calls[:]
    with pytest.raises(ValueError, match="needs call 1, which is not saved"):
        PartitionJoin.restore(config(), state)


@settings(max_examples=200, deadline=None)
@given(events=event_streams(), cuts=st.lists(st.floats(0, 1), max_size=6), base_cut=st.floats(0, 1))
def test_a_base_and_the_deltas_after_it_restore_the_join_exactly(
    events: list[pb.Event], cuts: list[float], base_cut: float
) -> None:
    """A base at any event, deltas at any later ones: restored = the join at the last delta,
    and both decide the same afterwards. A delta holds only what changed since the one before."""
    join = PartitionJoin(config())
    base_at = int(base_cut * len(events))
    points = sorted({base_at, *(base_at + int(c * (len(events) - base_at)) for c in cuts)})
    base: pb.JoinState | None = None
    deltas: list[pb.JoinState] = []
    for at in points:
        before = join.snapshot()
        run(join, events[:at])
        delta = join.delta()
        if base is None:
            base = join.snapshot()
            continue
        deltas.append(delta)
        after = {(k.request_id, k.item_id): k for k in join.snapshot().keys}
        earlier = {(k.request_id, k.item_id): k for k in before.keys}
        changed = {key for key, k in after.items() if earlier.get(key) != k}
        forgotten = set(earlier) - set(after)
        gone = {(k.request_id, k.item_id) for k in delta.forgotten}
        assert {(k.request_id, k.item_id) for k in delta.keys} >= changed
        assert gone >= forgotten  # and keys made and forgotten since, or forgotten and made again
    assert base is not None
    restored = PartitionJoin.restore(config(), base, deltas)
    assert restored.snapshot() == join.snapshot()
    assert restored.open_windows == join.open_windows
    assert [(e.position, e.sample) for e in run(restored, events)] == [
        (e.position, e.sample) for e in run(join, events)
    ]


# ------------------------------------------------------------ the snapshot store


class Crash(ConnectionError):
    """The process died at this write."""


class MemoryStore:
    """`StateStore` in memory, with a crash at a chosen write (put or delete)."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.writes = 0
        self.crash_at = crash_at
        self.put_bytes: Counter[str] = Counter()  # "base" / "delta" -> bytes put

    def _write(self) -> None:
        self.writes += 1
        if self.writes == self.crash_at:
            raise Crash(f"crashed at write {self.writes}")

    async def get(self, name: str) -> bytes | None:
        return self.objects.get(name)

    async def exists(self, name: str) -> bool:
        return name in self.objects

    async def put(self, name: str, data: bytes) -> None:
        self._write()
        self.objects[name] = data
        self.put_bytes["delta" if ".delta." in name else "base"] += len(data)

    async def delete(self, name: str) -> None:
        self._write()
        self.objects.pop(name, None)


def load(store: MemoryStore) -> tuple[PartitionJoin, int | None]:
    return asyncio.run(Snapshots(store, 0).load(config()))  # type: ignore[arg-type]


def saving(store: MemoryStore, events: list[pb.Event], every: int) -> list[pb.JoinState]:
    """Joins the events after what the store holds, saving every `every` events (samples_seq =
    the sequence); the state at each save, until the store crashes."""
    async def main() -> list[pb.JoinState]:
        snapshots = Snapshots(store, 0)  # type: ignore[arg-type]
        join, _ = await snapshots.load(config())
        states = []
        while join.last_seq < len(events):
            run(join, events[: join.last_seq + every])
            states.append(join.snapshot())
            try:
                await snapshots.save(join, join.last_seq)
            except Crash:
                return states
        return states

    return asyncio.run(main())


def saved_keys(store: MemoryStore) -> list[str]:
    return sorted(store.objects)


def test_saves_write_deltas_and_compact_when_they_outgrow_the_base() -> None:
    # A steady stream, a call a second: once the first windows close, the state keeps its size
    # (about 2 x 100 calls' keys, open and closed), while a save covers 2 calls.
    events = [impressions(f"r{k}", 1000.0 + k, ["a", "b", "c"]) for k in range(1600)]
    store = MemoryStore()
    states = saving(store, events, every=2)
    assert len(states) == 800
    join, samples_seq = load(store)
    assert join.snapshot() == states[-1] and samples_seq == 1600
    base = pb.JoinState.FromString(store.objects["partition-0"])
    deltas = [pb.JoinState.FromString(store.objects[n]) for n in saved_keys(store) if ".delta." in n]
    assert base.base > 2, "compacted more than once"
    assert sorted(d.delta for d in deltas) == list(range(1, len(deltas) + 1))
    assert all(d.base == base.base for d in deltas)  # the old bases' deltas are deleted
    delta_bytes = sum(len(store.objects[n]) for n in saved_keys(store) if ".delta." in n)
    assert delta_bytes <= COMPACTION_RATIO * len(store.objects["partition-0"])
    # Deltas hold what changed (a few keys), not every key remembered.
    assert max(len(d.keys) + len(d.forgotten) for d in deltas) < len(base.keys) / 10
    # Amortized: the bases written add up to no more than the deltas / COMPACTION_RATIO, plus the first base.
    assert store.put_bytes["base"] <= store.put_bytes["delta"] / COMPACTION_RATIO + 2 * len(store.objects["partition-0"])


def test_a_state_that_only_grows_is_saved_in_deltas_without_compacting() -> None:
    """A window filling up (nothing closes yet): the deltas are the keys themselves, written
    once; a compaction would rewrite all of them while the partition waits."""
    events = [impressions(f"r{k}", 1000.0 + k / 100, ["a", "b", "c"]) for k in range(600)]
    store = MemoryStore()
    states = saving(store, events, every=2)
    assert "partition-0" not in store.objects and store.put_bytes["base"] == 0
    join, _ = load(store)
    assert join.snapshot() == states[-1] and join.remembered == 1800


@settings(max_examples=150, deadline=None)
@given(events=event_streams(max_events=80), every=st.integers(1, 6), crash_at=st.integers(1, 60))
def test_a_crash_at_any_write_leaves_a_state_that_loads_and_was_saved(
    events: list[pb.Event], every: int, crash_at: int
) -> None:
    store = MemoryStore(crash_at=crash_at)
    states = saving(store, events, every)
    join, _ = load(store)
    # What loads is the state at a save that finished, or at the one the crash cut short.
    assert join.last_seq == 0 or join.snapshot() in states
    # Restarted from there, the join goes on saving; every later load is the join it saved.
    store.crash_at = None
    restarted = saving(store, events, every)
    final, samples_seq = load(store)
    assert restarted == [] or final.snapshot() == restarted[-1]
    fresh = PartitionJoin(config())
    run(fresh, events)
    assert final.snapshot() == fresh.snapshot() and samples_seq == len(events)


def test_a_base_of_an_earlier_release_loads_with_no_samples_seq_and_the_next_save_adds_deltas() -> None:
    join = PartitionJoin(config())
    feed(join, [impression(f"r{k}", 1000.0) for k in range(20)])
    store = MemoryStore()
    store.objects["partition-0"] = join.snapshot().SerializeToString()  # no base number, no samples_seq
    loaded, samples_seq = load(store)
    assert loaded.snapshot() == join.snapshot() and samples_seq is None
    events = [impression(f"r{k}", 1000.0) for k in range(20)] + [action("r1", 1001.0)]
    saving(store, events, every=1)
    assert "partition-0.delta.1" in store.objects and pb.JoinState.FromString(store.objects["partition-0"]).base == 0
    assert load(store)[1] == 21


# ------------------------------------------------------------ restart with batched publishing


def stored_positions(stream: list[Message], samples_seq: int) -> StoredSamples:
    """What a restart reads: the positions stored after `samples_seq`."""
    return StoredSamples(sample_position(m.headers) for m in stream[samples_seq:])


def as_stored(emitted: list[Emitted]) -> list[tuple[tuple[int, int, int], bytes]]:
    return sorted((e.position, e.sample.SerializeToString(deterministic=True)) for e in emitted)


@settings(max_examples=400, deadline=None)
@given(events=event_streams(), rate=st.sampled_from([1.0, 0.5]), data=st.data())
def test_restarts_after_any_failed_batch_store_exactly_the_undisturbed_output(
    events: list[pb.Event], rate: float, data: st.DataObject
) -> None:
    """The reader's loop against a model of `samples.<p>` (stream sequence = index + 1): fetch a
    batch of events, publish what they decide and is not stored; a batch of which any subset
    failed (a kill mid-batch, a lost acknowledgement) restarts, so does a kill between batches;
    snapshots (a base and deltas, `samples_seq` = the last sequence) only when `settled`. After
    the failing attempts, a clean one: SAMPLES holds every sample of the undisturbed join once."""
    cfg = config(negative_sample_rate=rate)
    undisturbed = PartitionJoin(cfg)
    full = run(undisturbed, events)
    stream: list[Message] = []
    saved: tuple[pb.JoinState, list[pb.JoinState], int] = (pb.JoinState(), [], 0)  # base, deltas, samples_seq
    failing = data.draw(st.integers(0, 4), label="failing attempts")
    for attempt in range(failing + 1):
        base, deltas, samples_seq = saved
        join = PartitionJoin.restore(cfg, base, deltas)
        stored = stored_positions(stream, samples_seq)
        while join.last_seq < len(events):
            size = data.draw(st.integers(1, 8), label="batch")
            messages = [sample_message(0, e) for e in stored.unpublished(run(join, events[: join.last_seq + size]))]
            failed: set[int] = set()
            if attempt < failing and messages:
                failed = data.draw(st.sets(st.sampled_from(range(len(messages)))), label="failed")
            stream.extend(m for k, m in enumerate(messages) if k not in failed)
            if failed or (attempt < failing and data.draw(st.booleans(), label="killed")):
                break
            if data.draw(st.booleans(), label="snapshot") and stored.settled(join.last_seq):
                if data.draw(st.booleans(), label="compact"):
                    join.delta()
                    saved = (join.snapshot(), [], len(stream))
                else:
                    saved = (saved[0], [*saved[1], join.delta()], len(stream))
    got = sorted((sample_position(m.headers), pb.Sample.FromString(m.payload).SerializeToString(deterministic=True))
                 for m in stream)  # fmt: skip
    assert got == as_stored(full)
    positions = [e.position for e in full]
    assert positions == sorted(set(positions))  # strictly increasing: one position per sample


def test_a_restart_from_a_snapshot_of_an_earlier_release_resumes_after_the_last_sample() -> None:
    """Earlier releases published one sample at a time, headers without `win-idx`."""
    events = [impression(f"r{k}", 1000.0 + k) for k in range(30)]
    events += [action(f"r{k}", 1001.0 + k) for k in range(0, 30, 2)]
    events.append(impression("end", 5000.0))
    full = run(PartitionJoin(config()), events)
    old = PartitionJoin(config())
    published = run(old, events[:40])
    at_35 = PartitionJoin(config())
    run(at_35, events[:35])  # its snapshot: every sample of events up to 35 was published
    last = published[-1]
    stored = StoredSamples(after=sample_position({"src-seq": str(last.src_seq), "win-seq": str(last.win_seq)}))
    restored = PartitionJoin.restore(config(), at_35.snapshot())
    rest = stored.unpublished(run(restored, events))
    assert as_stored(published + rest) == as_stored(full)
    assert not stored.settled(35) and stored.settled(40)


def test_stored_samples_are_not_published_again_and_settle_once_their_events_are_read_again() -> None:
    emitted = [Emitted(pb.Sample(request_id=f"r{k}").SerializeToString(), f"r{k}", "", 0.0, src_seq=5 + k // 2,
                       win_seq=k, win_idx=k % 2) for k in range(6)]  # fmt: skip
    stored = StoredSamples([e.position for e in emitted[1:4:2]])
    assert stored.unpublished(emitted) == [emitted[0], emitted[2], emitted[4], emitted[5]]
    assert [stored.settled(seq) for seq in (5, 6)] == [False, True]
    assert stored.unpublished(emitted) == emitted  # settled: later events decide none of them


@pytest.mark.parametrize("headers", [{}, {"src-seq": "x", "win-seq": "1"}, {"win-seq": "1"}])
def test_a_sample_without_a_valid_position_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="lack a valid position"):
        sample_position(headers)


def test_a_state_written_in_parts_is_the_state_written_whole() -> None:
    events = [impressions(f"r{k}", 1000.0 + k, ["a", "b", "c"]) for k in range(50)]
    join = PartitionJoin(config())
    run(join, events[:30])
    whole = join.snapshot()
    parts = list(join.snapshot_parts(keys_per_part=7))
    assert len(parts) > 5
    assert pb.JoinState.FromString(b"".join(p.SerializeToString() for p in parts)) == whole
    join.delta()
    run(join, events[:45])
    changed = list(join.delta_parts(keys_per_part=4))
    assert len(changed) > 3 and join.delta() == pb.JoinState(last_seq=join.last_seq, newest_time=join.newest_time)
    merged = pb.JoinState.FromString(b"".join(p.SerializeToString() for p in changed))
    assert len(merged.keys) == 45 and merged.last_seq == 45  # every key of the 15 calls since, once
