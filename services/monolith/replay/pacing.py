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

    The joiner closes an impression's window once its partition has seen an event more than
    window + lateness newer (event time). In real time an action follows its impression by
    seconds, long before such an event; in an accelerated replay with several workers, a
    far later event could reach the stream before an earlier event's action and turn that
    positive into a negative. So an event waits until every in-flight event older than it by
    `horizon` or more has finished (its Predict and its action are on the stream); the wait
    only happens across gaps of an hour or more in the data.

    Args:
        horizon: the joiner's window + lateness, event-time seconds.
        stop: set to end waits early.
    """

    def __init__(self, horizon: float, stop: threading.Event | None = None) -> None:
        self.horizon = horizon
        self._stop = stop or threading.Event()
        self._in_flight: Counter[float] = Counter()
        self._changed = threading.Condition()
        self.waits = 0  # events that had to wait
        self.waiting = 0  # events waiting now
        self.newest: float | None = None  # the newest event time that entered

    def enter(self, event_time: float) -> bool:
        """Waits until no in-flight event could be closed by one at `event_time`, then
        registers it as in flight; False (and not registered) if stopped first."""
        with self._changed:
            if self.blocked_by(event_time):
                self.waits += 1
                self.waiting += 1
                try:
                    while self.blocked_by(event_time):
                        if self._stop.is_set():
                            return False
                        self._changed.wait(0.1)
                finally:
                    self.waiting -= 1
            self._register(event_time)
            return True

    def enter_newest(self) -> float | None:
        """Registers an event at the newest time entered so far (None, registering nothing,
        before any): an event that belongs to "now" in event time, like a probe's.

        Taking the time and registering it happen at once, so no event entering later can
        close its window (one taken first and registered later could be behind by then).
        """
        with self._changed:
            if self.newest is not None:
                self._register(self.newest)
            return self.newest

    def _register(self, event_time: float) -> None:
        self._in_flight[event_time] += 1
        if self.newest is None or event_time > self.newest:
            self.newest = event_time

    def blocked_by(self, event_time: float) -> list[float]:
        """The in-flight events' times whose windows an event at `event_time` could close."""
        return [t for t in self._in_flight if event_time > t + self.horizon]

    def leave(self, event_time: float) -> None:
        """The event at `event_time` is done (its action, if any, was reported)."""
        with self._changed:
            self._in_flight[event_time] -= 1
            if self._in_flight[event_time] <= 0:
                del self._in_flight[event_time]
            self._changed.notify_all()
