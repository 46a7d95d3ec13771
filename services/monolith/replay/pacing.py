"""When each replayed event is due: event i at start + i / speed, on the wall clock.

A schedule, not a rate limiter: an event that is late (the stack answered slowly) goes out
at once and the ones after it keep their own due times, so the replay catches up and the
average rate is `speed` whenever the stack can take it.
"""

from __future__ import annotations

import math
import threading
import time
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
