"""Locks and the shard version clock used by the tables."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class ReadWriteLock:
    """Many readers or one writer, in alternating turns when both wait.

    A waiting writer blocks readers that arrive after it, so it cannot starve. Readers
    that were already waiting when a writer finishes go before the next writer, so a
    writer that comes straight back (an expiry sweep, window after window) cannot starve
    them either: a reader waits for at most the writer ahead of it.

    Readers run numba kernels that release the GIL, so lookups proceed in parallel while
    mutations (which may reallocate the arrays) run alone.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._writes_done = 0  # writer turns completed
        self._readers_owed = 0  # readers waiting when the last writer finished, not yet in

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            if self._writer or self._writers_waiting:
                turn = self._writes_done
                self._readers_waiting += 1
                while self._writer or (self._writers_waiting and self._writes_done == turn):
                    self._cond.wait()
                self._readers_waiting -= 1
                if self._writes_done != turn:
                    self._readers_owed -= 1
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @property
    def waiting_writers(self) -> int:
        """Writers waiting for the lock (for monitoring, and for tests that need a writer queued)."""
        with self._cond:
            return self._writers_waiting

    @property
    def waiting_readers(self) -> int:
        """Readers waiting for the lock (for monitoring, and for tests that need a reader queued)."""
        with self._cond:
            return self._readers_waiting

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers or self._readers_owed:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._writes_done += 1
                self._readers_owed = self._readers_waiting
                self._cond.notify_all()


class VersionClock:
    """A shard's version: every mutation takes the next number.

    An export fixes its version while the shard's gate keeps every mutation out (see
    `EmbeddingShard.export`), so the clock keeps no record of mutations in flight.
    """

    def __init__(self, start: int = 0) -> None:
        self._lock = threading.Lock()
        self._current = start

    @contextlib.contextmanager
    def mutation(self) -> Iterator[int]:
        """The next version, for the duration of one mutation."""
        with self._lock:
            self._current += 1
            version = self._current
        yield version

    @property
    def current(self) -> int:
        """The newest version handed out."""
        return self._current

    def advance_to(self, version: int) -> None:
        """Moves the clock forward (after restoring a checkpoint); never backwards."""
        with self._lock:
            self._current = max(self._current, version)
