"""Events for the joiner's tests: impressions (one, or a Predict call's `Impressions`),
actions, explicit negatives, and a hypothesis strategy of whole partitions of them."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.joiner.window import Emitted, PartitionJoin


def impression(request_id: str, t: float, item: str = "i") -> pb.Event:
    """One impression as earlier producers logged it, with a user and two genres."""
    imp = pb.Impression(request_id=request_id, item_id=item, event_time=t, model_version=3, score=0.5)
    imp.features["user_id"].values.append("u-" + request_id)
    imp.features["genres"].values.extend(["Comedy", "Drama"])
    return pb.Event(impression=imp)


def impressions(request_id: str, t: float, items: Sequence[str], times: Sequence[float | None] = ()) -> pb.Event:
    """One Predict call's candidates: the user shared, each item its own movie_id and genres.

    Args:
        times: per candidate, its own event time (None: the message's); default none.
    """
    message = pb.Impressions(request_id=request_id, event_time=t, model_version=3)
    message.shared_features["user_id"].values.append("u-" + request_id)
    message.shared_features["genres"].values.append("shared")  # every candidate has its own: theirs win
    for k, item in enumerate(items):
        candidate = message.candidates.add(item_id=item, score=0.25 * (k % 4))
        candidate.features["movie_id"].values.append(item)
        candidate.features["genres"].values.extend(["Comedy", item])
        if k < len(times) and times[k] is not None:
            candidate.event_time = times[k]
    return pb.Event(impressions=message)


def action(request_id: str, t: float, item: str = "i", label: float = 1.0, kind: str = "click") -> pb.Event:
    return pb.Event(action=pb.Action(request_id=request_id, item_id=item, kind=kind, label=label, event_time=t))


def dislike(request_id: str, t: float, item: str = "i") -> pb.Event:
    """An explicit negative: an action of one of the default config's negative kinds."""
    return action(request_id, t, item, label=0.0, kind="dislike")


def feed(join: PartitionJoin, events: Sequence[pb.Event], first_seq: int = 1) -> list[Emitted]:
    """Feeds `events` at sequences first_seq, first_seq + 1, ...; the samples decided, in order."""
    out: list[Emitted] = []
    for offset, event in enumerate(events):
        out.extend(join.add(first_seq + offset, event))
    return out


@st.composite
def event_streams(draw: st.DrawFn, max_events: int = 60) -> list[pb.Event]:
    """Impressions (one, or a call's candidates with repeats and own times), positive actions,
    actions labelled 0, explicit negatives, duplicates, out of order within lateness and beyond."""
    n = draw(st.integers(1, max_events))
    events = []
    t = 1000.0
    for _ in range(n):
        t += draw(st.sampled_from([0.0, 1.0, 5.0, 30.0, 120.0]))
        request = f"r{draw(st.integers(0, 15))}"
        item = draw(st.sampled_from(["a", "b"]))
        jitter = draw(st.sampled_from([0.0, -5.0, -20.0, -300.0]))
        kind = draw(st.integers(0, 7))
        if kind < 3:
            events.append(impression(request, t + jitter, item))
        elif kind < 5:
            items = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4))
            times = draw(st.lists(st.sampled_from([None, t - 50.0, t + 1.0]), max_size=len(items)))
            events.append(impressions(request, t + jitter, items, times))
        elif kind == 5:
            events.append(dislike(request, t + jitter, item))
        else:
            events.append(action(request, t + jitter, item, label=draw(st.sampled_from([1.0, 1.0, 0.0]))))
    return events
