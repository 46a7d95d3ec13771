"""A task run every few seconds on a daemon thread: sweeps, pulls, syncs."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

_LOGGER = logging.getLogger("monolith.periodic")


class PeriodicTask:
    """Calls `fn` every `interval` seconds (measured start to start) until `stop()`.

    An exception from `fn` is logged and the task goes on: a background job must outlive
    one bad run. `fn` may return a number of seconds to wait next instead of `interval`
    (e.g. to retry sooner while a dependency is not up yet).

    Args:
        name: the thread's name, also used in log lines.
        interval: seconds between runs (> 0).
        fn: the work.
        run_first: run at once on `start()`, rather than after one interval.
    """

    def __init__(self, name: str, interval: float, fn: Callable[[], float | None], run_first: bool = True) -> None:
        if interval <= 0:
            raise ValueError(f"{name}: interval must be > 0, got {interval}")
        self.name = name
        self._interval = interval
        self._fn = fn
        self._run_first = run_first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops after the run in progress, if any; final."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        if not self._run_first and self._stop.wait(self._interval):
            return
        while not self._stop.is_set():
            started = time.monotonic()
            delay = self._interval
            try:
                delay = self._fn() or self._interval
            except Exception:  # noqa: BLE001 - see the class docstring
                _LOGGER.exception("%s: run failed; trying again in %.1f s", self.name, delay)
            self._stop.wait(max(0.0, delay - (time.monotonic() - started)))
