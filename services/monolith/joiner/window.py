"""The join for one partition: events in stream order in, samples out, nothing else.

Everything `PartitionJoin` decides depends only on the events it was given, in order: no
clock, no randomness, no I/O. That is what makes the joiner exactly once across crashes
(see partition): a restarted joiner re-reads the events from a known point, rebuilds the
same state, decides the same samples, and publishes only those SAMPLES does not hold yet.

Semantics, per (request_id, item_id) key:
- A positive action (label >= 0.5) joined to its impression emits a positive sample at
  once. Only the first counts; later ones are duplicates.
- An explicit negative (an action of one of `negative_kinds`: a skip, a dislike, a low
  rating) joined to its impression decides the key at once: a negative sample (kept when
  `keeps_negative` says so, as any negative) and the key closes, with no window wait. The
  first decision stands: a positive after a negative, or a negative after a positive, is
  counted as conflicting and dropped.
- An impression's window closes when the watermark (the newest event time seen in the
  partition minus `lateness`) passes `impression time + window`. If no positive joined it,
  it becomes a negative, kept when `keeps_negative` says so (the rate goes on the sample).
- An action before its impression waits for it until the watermark passes
  `action time + window`; then it is an orphan (counted). If the impression still comes
  while the key is remembered, the two are joined late.
- After closing, a key is remembered for one more window, so a late action or a repeated
  impression is recognized and dropped; then it is forgotten.
- A closed key, and a key whose sample is decided, no longer holds its impression: only
  that it had one (so a repeated impression is still a duplicate, a late action late).
  Memory and snapshots scale with the open windows, not with the keys remembered.
- An `Impressions` message (one Predict call's candidates) is one impression per candidate
  (as `monolith.streams.events.candidate_impression` expands it): key (request_id, candidate.item_id),
  the shared features merged with the candidate's own (its own win a name clash), the
  candidate's event time if set, else the message's. A candidate repeated in the message,
  or whose key already had an impression, is a duplicate impression.

- An event whose request_id or item_id breaks the id rule (`monolith.streams.ids`: empty,
  too long, not UTF-8, control characters) is refused like an undecodable one, and so is
  an `Impressions` message with no candidates or a time that is not finite, as a whole:
  no candidate of it counts. Predict and ReportActions never store such an event, but
  another producer (an older release, a direct NATS client) may have; refusing it here, by
  the event alone, keeps it out of the keys, the snapshots and the samples' headers, and a
  restart decides the same.

Memory: a Predict call's message is kept once, serialized, while any of its keys needs it
(`_Source`), and made into a candidate's sample only when that is decided;
a key itself is a small record. Snapshots save each call once too (`JoinState.calls`),
the keys pointing into it.

Positions: a key's first position is (sequence, candidate index) of its first event (index
0 for an `Impression` or an action); two keys never share one. A sample's position is
(src_seq, win_seq, win_idx): the event that decided it, then its key's first position.
The samples of one event are emitted in (win_seq, win_idx) order, so positions increase
strictly along the output: where a restart resumes is well defined (see partition).

Restart: `snapshot()` captures the whole state after some event, `delta()` only what
changed since the previous `delta()` (the keys changed and the keys forgotten; neither
scans every key); `restore` rebuilds the state from a snapshot and the deltas after it.
A restarted joiner restores, re-reads the events after it, and decides the same samples.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.joiner.config import JoinerConfig, keeps_negative
from monolith.streams.events import candidate_time
from monolith.streams.ids import first_id_problem, id_problem

POSITIVE_LABEL = 0.5

Position = tuple[int, int, int]  # (src_seq, win_seq, win_idx)
Key = tuple[str, str]  # (request_id, item_id)
# Samples decided by an event, by their key's first position:
# (data, request_id, item_id, label, score, sample_rate, label_delay).
_Decided = list[tuple[tuple[int, int], tuple[bytes, str, str, float, float, float, float]]]


class Emitted(NamedTuple):
    """One sample decided, serialized, with where it comes from in the partition's event order."""

    data: bytes  # the serialized `Sample`
    request_id: str
    item_id: str
    label: float
    src_seq: int  # the event that decided it
    win_seq: int  # the first event of its key
    win_idx: int = 0  # the candidate index of its key in that event
    score: float = math.nan  # the probability served for its impression
    sample_rate: float = 1.0  # the fraction of samples like it kept (the sample's own field)
    label_delay: float = math.nan  # a positive's: event-time seconds from impression to action (0: action first)

    @property
    def position(self) -> Position:
        return (self.src_seq, self.win_seq, self.win_idx)

    @property
    def sample(self) -> pb.Sample:
        """The sample, parsed (for tools and tests: the joiner publishes `data`)."""
        return pb.Sample.FromString(self.data)


class _CallSamples:
    """A Predict call's message ready to make its candidates' samples from: what every sample
    shares, serialized once, and a candidate's own features, serialized when its sample is made.

    A sample is its scalar fields, then the shared features, then the candidate's own, as
    bytes joined: a protobuf map parsed from entries repeating a key keeps the last, so the
    candidate's own win a name clash, as `merge_candidate_features` has it. (`Candidate` and
    `Sample` both carry `map<string, FeatureValues> features = 3`: a candidate holding only its
    features serializes to exactly the entries of a sample's.)
    """

    __slots__ = ("message", "shared")

    def __init__(self, data: bytes) -> None:
        self.message = pb.Impressions.FromString(data)
        shared = pb.Sample()
        shared.features.MergeFrom(self.message.shared_features)
        self.shared = shared.SerializeToString()

    def own_features(self, idx: int) -> bytes:
        """Candidate `idx`'s own features as a `Sample`'s serialized features field."""
        candidate = pb.Candidate()
        candidate.CopyFrom(self.message.candidates[idx])
        for field in _CANDIDATE_NON_FEATURES:
            candidate.ClearField(field)
        return candidate.SerializeToString()


_CANDIDATE_NON_FEATURES = ("item_id", "score", "event_time")  # every field of a Candidate but `features`


class _Source:
    """An impression that keys still need: a lone `Impression` event's, or a Predict call's
    `Impressions` message, kept once, serialized, for all its candidates' keys."""

    __slots__ = ("seq", "data", "impression", "users")

    def __init__(self, seq: int = 0, data: bytes = b"", impression: pb.Impression | None = None) -> None:
        self.seq = seq  # the call's event sequence; 0 for a lone impression
        self.data = data  # the call's serialized `Impressions`
        self.impression = impression  # a lone impression
        self.users = 0  # keys holding it


@dataclasses.dataclass(slots=True)
class _Key:
    """What is known about one (request_id, item_id)."""

    first_seq: int
    first_idx: int = 0
    source: _Source | None = None  # its impression, while the key needs it: open and undecided
    source_idx: int = 0  # its candidate's index in the source call
    shown: bool = False  # an impression arrived
    positive: bool = False  # a positive action arrived
    negative: bool = False  # an explicit negative action arrived
    emitted: bool = False  # its sample went out
    closed: bool = False
    close_time: float = math.inf  # event time after which the window closes
    forget_time: float = math.inf


_Due = tuple[float, int, Key]  # (event time due, the key's first sequence, the key)


class _Deadlines:
    """Keys' deadlines (close or forget times), taken out in time order.

    Within a partition, deadlines mostly come in time order (a window or lateness after
    events that mostly come in time order, all the candidates of a call at once), so an
    entry no earlier than the last one queued goes on a FIFO, in O(1); the rest go on a
    heap. The earliest entry is the earlier of the two heads. Entries may go stale (the
    key was forgotten, or its deadline moved): the taker checks them against the key.
    """

    __slots__ = ("_fifo", "_heap")

    def __init__(self) -> None:
        self._fifo: deque[_Due] = deque()
        self._heap: list[_Due] = []

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap)

    def push(self, entry: _Due) -> None:
        fifo = self._fifo
        if not fifo or entry[0] >= fifo[-1][0]:
            fifo.append(entry)
        else:
            heapq.heappush(self._heap, entry)

    def pop_before(self, time: float) -> _Due | None:
        """Takes out the earliest entry if it is due before `time`, else None."""
        fifo, heap = self._fifo, self._heap
        if heap and (not fifo or heap[0][0] < fifo[0][0]):
            return heapq.heappop(heap) if heap[0][0] < time else None
        if fifo and fifo[0][0] < time:
            return fifo.popleft()
        return None


class PartitionJoin:
    """Open windows of one partition, fed events in stream-sequence order.

    Args:
        config: window, lateness, negative sampling.
        newest_time: the newest event time already seen.
    """

    def __init__(self, config: JoinerConfig, newest_time: float = -math.inf) -> None:
        self.config = config
        self.newest_time = newest_time
        self.counts: Counter[str] = Counter()
        self.last_seq = 0
        self._keys: dict[Key, _Key] = {}
        self._closing = _Deadlines()  # (close_time, first_seq, key)
        self._forgetting = _Deadlines()  # (forget_time, first_seq, key)
        self._open = 0  # keys not closed
        self._calls: dict[int, _Source] = {}  # event sequence -> a call some key holds
        self._parsed: dict[int, _CallSamples] = {}  # calls parsed during one add()
        # Since the last delta(), in the order they happened (dicts: a deterministic order).
        self._changed: dict[Key, None] = {}
        self._forgotten: dict[Key, None] = {}
        self._new_calls: dict[int, None] = {}
        self._gone_calls: dict[int, None] = {}

    @property
    def watermark(self) -> float:
        return self.newest_time - self.config.lateness

    @property
    def open_windows(self) -> int:
        """Keys not closed yet: impressions waiting for an action, actions for an impression."""
        return self._open

    @property
    def remembered(self) -> int:
        """Keys in memory, open or closed."""
        return len(self._keys)

    def add(self, seq: int, event: pb.Event) -> list[Emitted]:
        """Feeds the event at stream sequence `seq`; returns the samples it decides.

        Raises:
            ValueError: `seq` is not after the previous event's, or the event is empty, or
                refused (see the module docstring): nothing changes but the sequence read.
        """
        if seq <= self.last_seq:
            raise ValueError(f"event sequence {seq} is not after {self.last_seq}")
        self.last_seq = seq
        kind = event.WhichOneof("event")
        if kind is None:
            raise ValueError(f"event {seq} holds no impression, impressions or action")
        body = getattr(event, kind)
        decided: _Decided = []
        try:
            if kind == "impressions":
                _check_impressions(seq, body)
                event_time = self._call(seq, body, decided)
            else:
                _check_event(seq, kind, body)
                if kind == "impression":
                    source = _Source(impression=body)
                    self._impression(seq, 0, body.request_id, body.item_id, body.event_time, source, 0, decided)
                else:
                    self._action(seq, body, decided)
                event_time = body.event_time
            if event_time > self.newest_time:
                self.newest_time = event_time
            self._close_due(decided)
            self._forget_due()
        finally:
            self._parsed.clear()
        decided.sort(key=lambda d: d[0])
        return [Emitted(data, request_id, item_id, label, seq, win_seq, win_idx, score, rate, delay)
                for (win_seq, win_idx), (data, request_id, item_id, label, score, rate, delay) in decided]  # fmt: skip

    # ---------------------------------------------------------------- restart

    def snapshot(self) -> pb.JoinState:
        """The whole state after the last event read: `restore` rebuilds it exactly."""
        state = pb.JoinState()
        for part in self.snapshot_parts():
            state.MergeFrom(part)
        return state

    def snapshot_parts(self, keys_per_part: int = 4096) -> Iterator[pb.JoinState]:
        """`snapshot` in parts of at most `keys_per_part` keys; merged (or their bytes joined), the snapshot.

        The first part carries the clock. A caller on an event loop yields between parts, so
        a large snapshot does not stall the loop; the join must not be fed meanwhile.
        """
        yield pb.JoinState(last_seq=self.last_seq, newest_time=self.newest_time)
        yield from _call_parts([self._calls[seq] for seq in sorted(self._calls)], keys_per_part)
        keys = list(self._keys)
        for start in range(0, len(keys), keys_per_part):
            part = pb.JoinState()
            for key in keys[start : start + keys_per_part]:
                _save_key(part.keys, key, self._keys[key])
            yield part

    def delta(self) -> pb.JoinState:
        """What changed since the last `delta` (or the restore), and starts the next delta.

        The keys changed (whole) and the keys forgotten (ids alone; a key forgotten and made
        again is in both), and the clock: `restore(snapshot, [delta, ...])` is this join,
        for a snapshot taken before the first of those deltas and at or after the `delta`
        call before it. Its cost is that of the keys changed, not of every key.
        """
        state = pb.JoinState()
        for part in self.delta_parts():
            state.MergeFrom(part)
        return state

    def delta_parts(self, keys_per_part: int = 4096) -> Iterator[pb.JoinState]:
        """`delta` in parts, as `snapshot_parts`; the next delta starts when the first part is taken."""
        changed, forgotten = list(self._changed), self._forgotten
        new_calls, gone_calls = [self._calls[seq] for seq in self._new_calls], list(self._gone_calls)
        self._changed, self._forgotten, self._new_calls, self._gone_calls = {}, {}, {}, {}
        first = pb.JoinState(last_seq=self.last_seq, newest_time=self.newest_time, forgotten_calls=gone_calls)
        for request_id, item_id in forgotten:
            first.forgotten.add(request_id=request_id, item_id=item_id)
        yield first
        yield from _call_parts(new_calls, keys_per_part)
        for start in range(0, len(changed), keys_per_part):
            part = pb.JoinState()
            for key in changed[start : start + keys_per_part]:
                _save_key(part.keys, key, self._keys[key])
            yield part

    @classmethod
    def restore(cls, config: JoinerConfig, state: pb.JoinState, deltas: Iterable[pb.JoinState] = ()) -> PartitionJoin:
        """The join as it was when the last of `state` and `deltas` was taken (counts start from zero).

        Args:
            config: the join's settings.
            state: a whole snapshot (`snapshot`).
            deltas: the deltas taken after it (`delta`), in order.
        """
        join = cls(config)
        calls: dict[int, bytes] = {}
        held: dict[Key, tuple[int, int]] = {}  # key -> (call sequence, candidate index)
        last = state
        for part in (state, *deltas):
            for seq in part.forgotten_calls:
                calls.pop(seq, None)
            for saved_call in part.calls:
                calls[saved_call.seq] = saved_call.impressions
            for gone in part.forgotten:
                join._keys.pop((gone.request_id, gone.item_id), None)
                held.pop((gone.request_id, gone.item_id), None)
            join._load(part.keys, held)
            last = part
        join.newest_time, join.last_seq = last.newest_time, last.last_seq
        sources = {seq: _Source(seq, data) for seq, data in calls.items()}
        for key, (seq, idx) in held.items():
            if seq not in sources:
                raise ValueError(f"join state: key {key} needs call {seq}, which is not saved")
            join._hold(join._keys[key], sources[seq], idx)
        join._new_calls = {}
        # Deadlines of the final keys only: an entry per key, none stale.
        closing, forgetting = [], []
        for key, saved in join._keys.items():
            if saved.closed:
                forgetting.append((saved.forget_time, saved.first_seq, key))
            else:
                closing.append((saved.close_time, saved.first_seq, key))
        for entries, deadlines in ((closing, join._closing), (forgetting, join._forgetting)):
            for entry in sorted(entries):
                deadlines.push(entry)
        join._open = len(closing)
        return join

    def _load(self, keys: Iterable[pb.JoinKey], held: dict[Key, tuple[int, int]]) -> None:
        """Loads saved keys; a key holding a call's impression goes in `held` (resolved once every call is read)."""
        for saved in keys:
            if id_problem(saved.request_id) or id_problem(saved.item_id):
                continue  # saved by a release that took any id: its sample could not be published
            key = (saved.request_id, saved.item_id)
            # Releases before `shown` kept the impression of every key that had one.
            has_impression = saved.HasField("impression")
            needed = not (saved.closed or saved.emitted)
            state = self._keys[key] = _Key(
                first_seq=saved.first_seq, first_idx=saved.first_idx, shown=saved.shown or has_impression,
                positive=saved.positive, negative=saved.negative, emitted=saved.emitted, closed=saved.closed,
                close_time=saved.close_time, forget_time=saved.forget_time,
            )  # fmt: skip
            held.pop(key, None)
            if needed and saved.source_seq:
                held[key] = (saved.source_seq, saved.source_idx)
            elif needed and has_impression:
                self._hold(state, _Source(impression=saved.impression), 0)

    # ------------------------------------------------------------------ events

    def _call(self, seq: int, message: pb.Impressions, decided: _Decided) -> float:
        """A Predict call's candidates, each an impression; returns the newest event time among them."""
        source = _Source(seq, message.SerializeToString())
        request_id, call_time, newest = message.request_id, message.event_time, -math.inf
        for idx, candidate in enumerate(message.candidates):
            event_time = candidate.event_time if candidate.HasField("event_time") else call_time
            self._impression(seq, idx, request_id, candidate.item_id, event_time, source, idx, decided)
            newest = max(newest, event_time)
        return newest

    def _impression(
        self, seq: int, idx: int, request_id: str, item_id: str, event_time: float, source: _Source, source_idx: int,
        decided: _Decided,
    ) -> None:  # fmt: skip
        """An impression of `key` first seen at (seq, idx), its event time, and where it is kept."""
        self.counts["impressions"] += 1
        key = (request_id, item_id)
        state = self._keys.get(key)
        if state is not None and state.shown:
            self.counts["duplicate_impressions"] += 1
            return
        if state is None:
            state = self._remember(key, seq, idx)
        elif state.closed:
            # Its action gave up waiting (an orphan), but the impression did come: join them
            # late rather than lose a shown candidate.
            self.counts["late_impressions"] += 1
            state.closed = False
            state.forget_time = math.inf
            self._open += 1
        # An action that came first stops waiting: the impression's own window starts (the
        # heap entry of the wait goes stale: its close time no longer matches).
        self._changed[key] = None
        self._hold(state, source, source_idx)
        state.shown = True
        state.close_time = event_time + self.config.window
        self._closing.push((state.close_time, state.first_seq, key))
        if state.positive:
            self._emit(key, state, 1.0, 1.0, decided)
        elif state.negative:
            self._decide_negative(key, state, event_time, decided)

    def _action(self, seq: int, action: pb.Action, decided: _Decided) -> None:
        self.counts["actions"] += 1
        key = (action.request_id, action.item_id)
        state = self._keys.get(key)
        if state is not None and state.closed:
            self.counts["late_actions"] += 1
            return
        negative = action.kind in self.config.negative_kinds
        positive = not negative and action.label >= POSITIVE_LABEL
        if state is None:
            state = self._remember(key, seq, 0)
            state.close_time = action.event_time + self.config.window
            self._closing.push((state.close_time, state.first_seq, key))
            self.counts["early_actions"] += 1
        if not (positive or negative):
            return
        if (state.positive and positive) or (state.negative and negative):
            self.counts["duplicate_actions"] += 1
            return
        if state.positive or state.negative:
            self.counts["conflicting_actions"] += 1  # the first decision stands
            return
        self._changed[key] = None
        if negative:
            self.counts["negative_actions"] += 1
            state.negative = True
            if state.shown:
                self._decide_negative(key, state, action.event_time, decided)
            return
        state.positive = True
        if state.shown:
            self._emit(key, state, 1.0, 1.0, decided, action.event_time)

    # ------------------------------------------------------------ impressions

    def _hold(self, state: _Key, source: _Source, idx: int) -> None:
        """The key keeps its impression (candidate `idx` of `source`) until it is decided or closes."""
        state.source, state.source_idx = source, idx
        source.users += 1
        if source.seq and source.users == 1:
            self._calls[source.seq] = source
            self._new_calls[source.seq] = None

    def _release(self, state: _Key) -> None:
        """The key no longer needs its impression; a call no key needs is dropped."""
        source, state.source = state.source, None
        if source is None:
            return
        source.users -= 1
        if source.seq and source.users == 0:
            del self._calls[source.seq]
            if source.seq in self._new_calls:
                del self._new_calls[source.seq]  # not saved yet: nothing to forget
            else:
                self._gone_calls[source.seq] = None

    def _sample(self, key: Key, state: _Key, label: float, rate: float) -> tuple[bytes, float, float]:
        """The key's sample, serialized, from the impression it holds; its served score and event time."""
        source = state.source
        assert source is not None
        if source.impression is not None:
            impression = source.impression
            sample = pb.Sample(request_id=key[0], item_id=key[1], label=label, sample_rate=rate,
                               event_time=impression.event_time, model_version=impression.model_version)  # fmt: skip
            sample.features.MergeFrom(impression.features)
            return sample.SerializeToString(), impression.score, impression.event_time
        call = self._parsed.get(source.seq)
        if call is None:
            call = self._parsed[source.seq] = _CallSamples(source.data)
        message = call.message
        candidate = message.candidates[state.source_idx]
        event_time = candidate_time(message, candidate)
        head = pb.Sample(request_id=key[0], item_id=key[1], label=label, sample_rate=rate,
                         model_version=message.model_version, event_time=event_time)  # fmt: skip
        return head.SerializeToString() + call.shared + call.own_features(state.source_idx), candidate.score, event_time

    # ---------------------------------------------------------------- windows

    def _remember(self, key: Key, seq: int, idx: int) -> _Key:
        state = _Key(first_seq=seq, first_idx=idx)
        self._keys[key] = state
        self._open += 1
        self._changed[key] = None  # if it was forgotten since the last delta, it stays so: restore drops it first
        return state

    def _close_due(self, decided: _Decided) -> None:
        watermark = self.watermark
        while (due := self._closing.pop_before(watermark)) is not None:
            close_time, first_seq, key = due
            state = self._keys.get(key)
            # Stale heap entries: the key was forgotten, or its close time moved.
            if state is None or state.closed or state.first_seq != first_seq or state.close_time != close_time:
                continue
            if not state.shown:
                self.counts["orphan_actions"] += 1
            elif not state.emitted:
                self._negative(key, state, decided)
            self._close(key, state, close_time)

    def _negative(self, key: Key, state: _Key, decided: _Decided) -> None:
        """Emits the key's negative sample, or counts it sampled out (a stable hash of the key decides)."""
        if keeps_negative(key[0], key[1], self.config.negative_sample_rate):
            self._emit(key, state, 0.0, self.config.negative_sample_rate, decided)
        else:
            self.counts["negatives_sampled_out"] += 1

    def _decide_negative(self, key: Key, state: _Key, event_time: float, decided: _Decided) -> None:
        """An explicit negative joined to its impression: the negative now, and the key closes."""
        self._negative(key, state, decided)
        self._close(key, state, event_time)

    def _close(self, key: Key, state: _Key, at: float) -> None:
        """Closes a key at event time `at`; it is remembered one more window, then forgotten."""
        state.closed = True
        self._release(state)
        state.forget_time = at + self.config.window
        self._forgetting.push((state.forget_time, state.first_seq, key))
        self._open -= 1
        self._changed[key] = None

    def _forget_due(self) -> None:
        watermark = self.watermark
        while (due := self._forgetting.pop_before(watermark)) is not None:
            forget_time, first_seq, key = due
            state = self._keys.get(key)
            if state is not None and state.first_seq == first_seq and state.forget_time == forget_time:
                del self._keys[key]
                self._changed.pop(key, None)
                self._forgotten[key] = None

    def _emit(self, key: Key, state: _Key, label: float, rate: float, decided: _Decided,
              action_time: float | None = None) -> None:  # fmt: skip
        """Decides the key's sample; `action_time`: the positive action's, if it came after the impression."""
        data, score, shown_at = self._sample(key, state, label, rate)
        state.emitted = True
        self._release(state)  # decided: the sample carries what it needs
        self._changed[key] = None
        self.counts["positives" if label else "negatives"] += 1
        delay = (0.0 if action_time is None else max(0.0, action_time - shown_at)) if label else math.nan
        decided.append(((state.first_seq, state.first_idx), (data, key[0], key[1], label, score, rate, delay)))


def _check_event(seq: int, kind: str, body: pb.Impression | pb.Action) -> None:
    """Raises ValueError if an impression or an action is refused: a time not finite, a bad id."""
    if not math.isfinite(body.event_time):
        raise ValueError(f"event {seq}: event_time {body.event_time} is not finite")
    for field in ("request_id", "item_id"):
        problem = id_problem(getattr(body, field))
        if problem is not None:
            raise ValueError(f"event {seq}: {kind}.{field}: {problem}")


def _check_impressions(seq: int, message: pb.Impressions) -> None:
    """Raises ValueError if an `Impressions` message is refused as a whole (see the module docstring)."""
    if not message.candidates:
        raise ValueError(f"event {seq}: impressions has no candidates")
    problem = id_problem(message.request_id)
    if problem is not None:
        raise ValueError(f"event {seq}: impressions.request_id: {problem}")
    item_ids = [candidate.item_id for candidate in message.candidates]
    found = (item_ids.index(""), "is required") if "" in item_ids else first_id_problem(item_ids)
    if found is not None:
        raise ValueError(f"event {seq}: impressions.candidates[{found[0]}].item_id: {found[1]}")
    times = [message.event_time, *(c.event_time for c in message.candidates if c.HasField("event_time"))]
    if not all(map(math.isfinite, times)):
        raise ValueError(f"event {seq}: impressions: an event_time is not finite: {times}")


def _save_key(keys: RepeatedCompositeFieldContainer[pb.JoinKey], key: Key, state: _Key) -> None:
    """Appends what is known of `key` to `keys`."""
    source = state.source
    keys.add(
        request_id=key[0], item_id=key[1], first_seq=state.first_seq, first_idx=state.first_idx,
        impression=source.impression if source is not None else None,
        source_seq=source.seq if source is not None else 0, source_idx=state.source_idx if source is not None else 0,
        shown=state.shown, positive=state.positive, negative=state.negative, emitted=state.emitted,
        closed=state.closed, close_time=state.close_time, forget_time=state.forget_time,
    )  # fmt: skip


def _call_parts(calls: list[_Source], keys_per_part: int) -> Iterator[pb.JoinState]:
    """Saved calls in parts of about `keys_per_part` candidates' worth (a call is about 100)."""
    per_part = max(1, keys_per_part // 100)
    for start in range(0, len(calls), per_part):
        yield pb.JoinState(calls=[pb.SavedCall(seq=c.seq, impressions=c.data) for c in calls[start : start + per_part]])
