"""The join for one partition: events in stream order in, samples out, nothing else.

Everything `PartitionJoin` decides depends only on the events it was given, in order: no
clock, no randomness, no I/O. That is what makes the joiner exactly once across crashes
(see partition): a restarted joiner re-reads the events from a known point, rebuilds the
same state, decides the same samples, and publishes only those after the last one it had
published.

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
- An event whose request_id or item_id breaks the id rule (`monolith.streams.ids`: empty,
  too long, not UTF-8, control characters) is refused like an undecodable one. Predict
  and ReportActions never store such an event, but another producer (an older release, a
  direct NATS client) may have; refusing it here, by the event alone, keeps it out of the
  keys, the snapshots and the samples' headers, and a restart decides the same.

Restart: `snapshot()` captures the whole state after some event; `restore` rebuilds it.
A restarted joiner restores its last snapshot, re-reads the events after it, decides the
same samples, and publishes only those after the last one it had published. Samples of
one event are emitted in `win_seq` order (the first sequence of their key), so
(src_seq, win_seq) increases strictly along the output and says where to resume.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import Counter

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.joiner.config import JoinerConfig, keeps_negative
from monolith.streams.ids import id_problem

POSITIVE_LABEL = 0.5


@dataclasses.dataclass(frozen=True)
class Emitted:
    """One sample decided, with where it comes from in the partition's event order."""

    sample: pb.Sample
    src_seq: int  # the event that decided it
    win_seq: int  # the first event of its key

    @property
    def position(self) -> tuple[int, int]:
        return (self.src_seq, self.win_seq)


@dataclasses.dataclass
class _Key:
    """What is known about one (request_id, item_id)."""

    first_seq: int
    impression: pb.Impression | None = None
    positive: bool = False  # a positive action arrived
    negative: bool = False  # an explicit negative action arrived
    emitted: bool = False  # its sample went out
    closed: bool = False
    close_time: float = math.inf  # event time after which the window closes
    forget_time: float = math.inf


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
        self._keys: dict[tuple[str, str], _Key] = {}
        self._closing: list[tuple[float, int, tuple[str, str]]] = []  # (close_time, first_seq, key)
        self._forgetting: list[tuple[float, int, tuple[str, str]]] = []
        self.last_seq = 0

    @property
    def watermark(self) -> float:
        return self.newest_time - self.config.lateness

    @property
    def open_windows(self) -> int:
        """Keys still waiting: impressions for an action or actions for an impression."""
        return sum(1 for k in self._keys.values() if not k.closed)

    @property
    def remembered(self) -> int:
        """Keys in memory, open or closed."""
        return len(self._keys)

    def add(self, seq: int, event: pb.Event) -> list[Emitted]:
        """Feeds the event at stream sequence `seq`; returns the samples it decides.

        Raises:
            ValueError: `seq` is not after the previous event's, or the event is empty, has
                a time that is not finite or an id that breaks the id rule (nothing changes
                but the sequence read).
        """
        if seq <= self.last_seq:
            raise ValueError(f"event sequence {seq} is not after {self.last_seq}")
        self.last_seq = seq
        decided: list[tuple[int, pb.Sample]] = []
        kind = event.WhichOneof("event")
        if kind is None:
            raise ValueError(f"event {seq} holds neither an impression nor an action")
        body = getattr(event, kind)
        event_time = body.event_time
        if not math.isfinite(event_time):
            raise ValueError(f"event {seq}: event_time {event_time} is not finite")
        for field in ("request_id", "item_id"):
            problem = id_problem(getattr(body, field))
            if problem is not None:
                raise ValueError(f"event {seq}: {kind}.{field}: {problem}")
        if kind == "impression":
            self._impression(seq, event.impression, decided)
        else:
            self._action(seq, event.action, decided)
        if event_time > self.newest_time:
            self.newest_time = event_time
        self._close_due(decided)
        self._forget_due()
        decided.sort(key=lambda d: d[0])
        return [Emitted(sample, seq, win_seq) for win_seq, sample in decided]

    # ---------------------------------------------------------------- restart

    def snapshot(self) -> pb.JoinState:
        """The whole state after the last event read: `restore` rebuilds it exactly."""
        state = pb.JoinState(last_seq=self.last_seq, newest_time=self.newest_time)
        for (request_id, item_id), key in self._keys.items():
            saved = state.keys.add(
                request_id=request_id, item_id=item_id, first_seq=key.first_seq, positive=key.positive,
                negative=key.negative, emitted=key.emitted, closed=key.closed, close_time=key.close_time, forget_time=key.forget_time,
            )  # fmt: skip
            if key.impression is not None:
                saved.impression.CopyFrom(key.impression)
        return state

    @classmethod
    def restore(cls, config: JoinerConfig, state: pb.JoinState) -> PartitionJoin:
        """The join as it was when `state` was taken (counts start from zero)."""
        join = cls(config, newest_time=state.newest_time)
        join.last_seq = state.last_seq
        for saved in state.keys:
            if id_problem(saved.request_id) or id_problem(saved.item_id):
                continue  # saved by a release that took any id: its sample could not be published
            key = (saved.request_id, saved.item_id)
            join._keys[key] = _Key(
                first_seq=saved.first_seq,
                impression=saved.impression if saved.HasField("impression") else None,
                positive=saved.positive, negative=saved.negative, emitted=saved.emitted, closed=saved.closed,
                close_time=saved.close_time, forget_time=saved.forget_time,
            )  # fmt: skip
            # Only live heap entries matter: stale ones are skipped when popped.
            if saved.closed:
                heapq.heappush(join._forgetting, (saved.forget_time, saved.first_seq, key))
            else:
                heapq.heappush(join._closing, (saved.close_time, saved.first_seq, key))
        return join

    # ------------------------------------------------------------------ events

    def _impression(self, seq: int, impression: pb.Impression, decided: list[tuple[int, pb.Sample]]) -> None:
        self.counts["impressions"] += 1
        key = (impression.request_id, impression.item_id)
        state = self._keys.get(key)
        if state is not None and state.impression is not None:
            self.counts["duplicate_impressions"] += 1
            return
        if state is None:
            state = self._remember(key, seq)
        elif state.closed:
            # Its action gave up waiting (an orphan), but the impression did come: join them
            # late rather than lose a shown candidate.
            self.counts["late_impressions"] += 1
            state.closed = False
            state.forget_time = math.inf
        # An action that came first stops waiting: the impression's own window starts (the
        # heap entry of the wait goes stale: its close time no longer matches).
        state.impression = impression
        state.close_time = impression.event_time + self.config.window
        heapq.heappush(self._closing, (state.close_time, state.first_seq, key))
        if state.positive:
            self._emit(key, state, 1.0, 1.0, decided)
        elif state.negative:
            self._decide_negative(key, state, impression.event_time, decided)

    def _action(self, seq: int, action: pb.Action, decided: list[tuple[int, pb.Sample]]) -> None:
        self.counts["actions"] += 1
        key = (action.request_id, action.item_id)
        state = self._keys.get(key)
        if state is not None and state.closed:
            self.counts["late_actions"] += 1
            return
        negative = action.kind in self.config.negative_kinds
        positive = not negative and action.label >= POSITIVE_LABEL
        if state is None:
            state = self._remember(key, seq)
            state.close_time = action.event_time + self.config.window
            heapq.heappush(self._closing, (state.close_time, state.first_seq, key))
            self.counts["early_actions"] += 1
        if not (positive or negative):
            return
        if (state.positive and positive) or (state.negative and negative):
            self.counts["duplicate_actions"] += 1
            return
        if state.positive or state.negative:
            self.counts["conflicting_actions"] += 1  # the first decision stands
            return
        if negative:
            self.counts["negative_actions"] += 1
            state.negative = True
            if state.impression is not None:
                self._decide_negative(key, state, action.event_time, decided)
            return
        state.positive = True
        if state.impression is not None:
            self._emit(key, state, 1.0, 1.0, decided)

    # ---------------------------------------------------------------- windows

    def _remember(self, key: tuple[str, str], seq: int) -> _Key:
        state = _Key(first_seq=seq)
        self._keys[key] = state
        return state

    def _close_due(self, decided: list[tuple[int, pb.Sample]]) -> None:
        watermark = self.watermark
        while self._closing and self._closing[0][0] < watermark:
            close_time, first_seq, key = heapq.heappop(self._closing)
            state = self._keys.get(key)
            # Stale heap entries: the key was forgotten, or its close time moved.
            if state is None or state.closed or state.first_seq != first_seq or state.close_time != close_time:
                continue
            if state.impression is None:
                self.counts["orphan_actions"] += 1
            elif not state.emitted:
                self._negative(key, state, decided)
            self._close(key, state, close_time)

    def _negative(self, key: tuple[str, str], state: _Key, decided: list[tuple[int, pb.Sample]]) -> None:
        """Emits the key's negative sample, or counts it sampled out (a stable hash of the key decides)."""
        if keeps_negative(key[0], key[1], self.config.negative_sample_rate):
            self._emit(key, state, 0.0, self.config.negative_sample_rate, decided)
        else:
            self.counts["negatives_sampled_out"] += 1

    def _decide_negative(
        self, key: tuple[str, str], state: _Key, event_time: float, decided: list[tuple[int, pb.Sample]]
    ) -> None:
        """An explicit negative joined to its impression: the negative now, and the key closes."""
        self._negative(key, state, decided)
        self._close(key, state, event_time)

    def _close(self, key: tuple[str, str], state: _Key, at: float) -> None:
        """Closes a key at event time `at`; it is remembered one more window, then forgotten."""
        state.closed = True
        state.forget_time = at + self.config.window
        heapq.heappush(self._forgetting, (state.forget_time, state.first_seq, key))

    def _forget_due(self) -> None:
        watermark = self.watermark
        while self._forgetting and self._forgetting[0][0] < watermark:
            forget_time, first_seq, key = heapq.heappop(self._forgetting)
            state = self._keys.get(key)
            if state is not None and state.first_seq == first_seq and state.forget_time == forget_time:
                del self._keys[key]

    def _emit(
        self, key: tuple[str, str], state: _Key, label: float, rate: float, decided: list[tuple[int, pb.Sample]]
    ) -> None:
        impression = state.impression
        assert impression is not None
        state.emitted = True
        self.counts["positives" if label else "negatives"] += 1
        sample = pb.Sample(
            request_id=key[0],
            item_id=key[1],
            label=label,
            event_time=impression.event_time,
            sample_rate=rate,
            model_version=impression.model_version,
        )
        for name, values in impression.features.items():
            sample.features[name].CopyFrom(values)
        decided.append((state.first_seq, sample))
