"""A sampling profiler of every thread, to say what limits a benchmark that misses a bar.

cProfile sees only the thread that enabled it, while the work of a server (gRPC handler
threads) or of a concurrent comparison runs on many threads, and numba kernels that
release the GIL are invisible to a tracing profiler's call counts anyway. So this samples
the Python stacks of all threads (`sys._current_frames`) every few milliseconds and
reports, per function, the share of busy samples in which it was on the stack
(cumulative) and on top (self). Threads parked in a wait (idle pool workers, a server's
polling thread, a main thread waiting for termination) are not busy and not counted.

A role process is profiled by running it through this module:
`python -m monolith.harness.bench.sampling OUT.json <monolith args...>` writes the summary to
OUT.json when the role exits (e.g. on SIGTERM); SIGUSR1 forgets what was sampled so far,
so the summary can cover a load alone, without the start-up.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Callable

from monolith.common.periodic import PeriodicTask

# (file name, function) of frames where a thread waits rather than works.
_IDLE = {
    ("threading.py", "wait"),
    ("threading.py", "_wait_for_tstate_lock"),
    ("threading.py", "join"),
    ("queue.py", "get"),
    ("thread.py", "_worker"),  # concurrent.futures pool worker waiting for a task
    ("selectors.py", "select"),
    ("socketserver.py", "serve_forever"),
    ("_server.py", "_serve"),  # grpc server's completion-queue poller
    ("_channel.py", "_poll_connectivity"),
    ("_channel.py", "channel_spin"),
    ("_common.py", "wait"),
    ("sampling.py", "_run"),
}


def _where(frame: FrameType) -> tuple[str, str]:
    """(file, function) of a frame: the file as its last two path parts."""
    code = frame.f_code
    parts = code.co_filename.replace("\\", "/").split("/")
    short = "/".join(parts[-2:]) if parts[-2:-1] != ["site-packages"] else parts[-1]
    return short, code.co_name


def _is_project_work(path: str) -> bool:
    """A monolith module other than the entry points and this benchmark harness."""
    package, _, module = path.partition("/")
    return package in _PROJECT_PACKAGES and module != "cli.py"


_PROJECT_PACKAGES = {
    "common", "data", "embedding", "embedding_ps", "dense_ps", "model", "trainer", "serving", "joiner", "streams",
}


class Sampler:
    """Samples every thread's stack until stopped.

    Args:
        interval: seconds between samples.
        threads: sample only these thread idents (read at every tick, so threads started
            later can be added); None samples every thread.
        include_idle: count waiting threads too, e.g. to show a thread blocked on a lock.
    """

    def __init__(self, interval: float = 0.005, threads: set[int] | None = None, include_idle: bool = False) -> None:
        self._threads = threads
        self._include_idle = include_idle
        self._task = PeriodicTask("bench-sampler", interval, self._locked_tick, run_first=False)
        self._cumulative: collections.Counter[tuple[str, str]] = collections.Counter()
        self._self: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()  # a reset must not interleave with a tick
        self.busy_samples = 0
        self.ticks = 0

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._task.start()

    def stop(self) -> None:
        self._task.stop()

    def reset(self) -> None:
        """Forgets the samples so far (e.g. a process's start-up), keeps sampling."""
        with self._lock:
            self._cumulative.clear()
            self._self.clear()
            self.busy_samples = self.ticks = 0

    def _locked_tick(self) -> None:
        with self._lock:
            self._tick()

    def _tick(self) -> None:
        me = threading.get_ident()
        self.ticks += 1
        for ident, frame in sys._current_frames().items():
            if ident == me or (self._threads is not None and ident not in self._threads):
                continue
            top = _where(frame)
            if not self._include_idle and (top[0].rsplit("/", 1)[-1], top[1]) in _IDLE:
                continue
            seen = set()
            f: FrameType | None = frame
            while f is not None:
                seen.add(_where(f))
                f = f.f_back
            self.busy_samples += 1
            self._self[top] += 1
            self._cumulative.update(seen)

    def summary(self, top: int = 10) -> list[str]:
        """Readable lines: the functions with the most samples on top of the stack (self),
        then the project functions with the most samples anywhere on it (cumulative)."""
        if not self.busy_samples:
            return ["no busy samples"]
        share = lambda count: f"{100 * count / self.busy_samples:5.1f}%"  # noqa: E731
        lines = [f"{self.busy_samples} thread-samples over {self.ticks} ticks "
                 f"({self.busy_samples / max(1, self.ticks):.2f} busy threads on average); self:"]  # fmt: skip
        lines += [f"{share(n)}  {path}:{name}" for (path, name), n in self._self.most_common(top)]
        lines.append("cumulative, project code:")
        project = [(key, n) for key, n in self._cumulative.most_common() if _is_project_work(key[0])]
        lines += [f"{share(n)}  {path}:{name}" for (path, name), n in project[:top]]
        return lines


def profile_while(work: Callable[[], object], seconds: float) -> list[str]:
    """Runs `work()` repeatedly for `seconds` under a Sampler; returns its summary."""
    with Sampler() as sampler:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            work()
    return sampler.summary()


def _main(argv: list[str]) -> int:
    out, args = argv[0], argv[1:]
    sampler = Sampler()

    def write() -> None:
        sampler.stop()
        tmp = f"{out}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sampler.summary(), f)
        os.replace(tmp, out)

    atexit.register(write)
    # SIGUSR1 starts the window that counts, so a caller can leave start-up out.
    signal.signal(signal.SIGUSR1, lambda signum, frame: sampler.reset())
    sampler.start()
    from monolith.cli import main

    return main(args)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
