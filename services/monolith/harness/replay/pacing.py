"""When each replayed event is due: event i at start + i / speed, on the wall clock.

A schedule, not a rate limiter: an event that is late (the stack answered slowly) goes out
at once and the ones after it keep their own due times, so the replay catches up and the
average rate is `speed` whenever the stack can take it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from typing import Callable


class Pacer:
    """The due time of each event at `speed` events per second.

    Args:
        speed: events per second; 0 or infinity: every event is due at once.
        clock: monotonic seconds (injectable for tests).
        wait: blocks up to the given seconds, returning True if the replay should stop
            (defaults to waiting on `stop`).
        stop: set to end waits early.
    """

    def __init__(self, speed: float, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], bool] | None = None, stop: threading.Event | None = None) -> None:  # fmt: skip
        if not speed >= 0:
            raise ValueError(f"speed must be >= 0 events/s, got {speed}")
        self.speed = speed
        self._clock = clock
        self._stop = stop or threading.Event()
        self._wait = wait or self._stop.wait
        self.start = clock()

    @property
    def unpaced(self) -> bool:
        return self.speed == 0 or math.isinf(self.speed)

    def due(self, i: int) -> float:
        """The clock reading at which event i (0-based) is due."""
        return self.start if self.unpaced else self.start + i / self.speed

    def wait_for(self, i: int) -> bool:
        """Blocks until event i is due; returns False if stopped first."""
        while True:
            if self._stop.is_set():
                return False
            remaining = self.due(i) - self._clock()
            if remaining <= 0:
                return True
            if self._wait(remaining):
                return False

    def behind(self, i: int) -> float:
        """Seconds event i is late at this moment (0 if not yet due)."""
        return max(0.0, self._clock() - self.due(i))


class WindowGate:
    """Holds back an event that could close the join window of an event still in flight.

    The joiner closes an impression's window once the impression's partition has seen an
    event more than window + lateness newer (event time). In real time an action follows its
    impression by seconds, long before such an event; in an accelerated replay with several
    workers, a far later event of the same partition could reach the stream before an
    earlier event's action and turn that positive into a negative. So an event waits until
    every in-flight event of its partition older than it by more than `horizon` has finished
    (its Predict and its action are on the stream). Events of other partitions never wait
    for each other: they move other watermarks.

    Args:
        horizon: the joiner's window + lateness, event-time seconds.
        stop: set to end waits early.
    """

    def __init__(self, horizon: float, stop: threading.Event | None = None) -> None:
        self.horizon = horizon
        self._stop = stop or threading.Event()
        self._in_flight: dict[int, Counter[float]] = {}  # partition -> event times in flight
        self._changed = threading.Condition()
        self.waits = 0  # events that had to wait
        self.waiting = 0  # events waiting now
        self.newest: float | None = None  # the newest event time that entered

    def enter(self, event_time: float, partition: int) -> bool:
        """Waits until no in-flight event of `partition` could be closed by one at
        `event_time`, then registers it as in flight; False (and not registered) if stopped first."""
        with self._changed:
            if not self._wait(lambda: self.blocked_by(event_time, partition)):
                return False
            self._register(event_time, partition)
            return True

    def enter_newest(self, partition: int) -> float | None:
        """Registers an event of `partition` at the newest time entered so far: an event that
        belongs to "now" in event time, like a probe's. Returns that time; None (registering
        nothing) before any event, or if stopped.

        The time is taken and registered at once, so no event entering later can close the
        window (a time taken first and registered later could be far behind by then); it
        waits like `enter` for older in-flight events of the partition.
        """
        with self._changed:
            if self.newest is None or not self._wait(lambda: self.blocked_by(self.newest, partition)):
                return None
            self._register(self.newest, partition)
            return self.newest

    def leave(self, event_time: float, partition: int) -> None:
        """The event at `event_time` is done (its action, if any, was reported)."""
        with self._changed:
            times = self._in_flight[partition]
            times[event_time] -= 1
            if times[event_time] <= 0:
                del times[event_time]
            self._changed.notify_all()

    def blocked_by(self, event_time: float, partition: int) -> list[float]:
        """The times of in-flight events of `partition` whose windows an event at `event_time` could close."""
        return [t for t in self._in_flight.get(partition, ()) if event_time > t + self.horizon]

    def _wait(self, blocked: Callable[[], list[float]]) -> bool:
        """Waits (holding the condition) while `blocked()` names events; False if stopped first."""
        if not blocked():
            return True
        self.waits += 1
        self.waiting += 1
        try:
            while blocked():
                if self._stop.is_set():
                    return False
                self._changed.wait(0.1)
            return True
        finally:
            self.waiting -= 1

    def _register(self, event_time: float, partition: int) -> None:
        self._in_flight.setdefault(partition, Counter())[event_time] += 1
        if self.newest is None or event_time > self.newest:
            self.newest = event_time
