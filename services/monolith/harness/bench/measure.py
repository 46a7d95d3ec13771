"""How the benchmarks time a comparison: interleaved rounds, medians, concurrent callers.

Both sides of a ratio run the same way: each round runs every side once, the side that
goes first alternates, and each figure is the median over rounds, so machine noise (other
processes on a shared machine, CPU frequency) hits both sides alike.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent import futures
from typing import Callable, Mapping, TypeVar

T = TypeVar("T")

ROUNDS = 5


def interleaved(sides: Mapping[str, Callable[[], T]], rounds: int = ROUNDS) -> dict[str, list[T]]:
    """Runs each side once per round, alternating the order; returns each side's results."""
    names = list(sides)
    out: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(sides[name]())
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Calls fn (which returns the items it handled) until `seconds` pass; items per second."""
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def concurrent_calls(call: Callable[[int], object], concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """`call(i)` back to back from `concurrency` threads for `seconds`.

    Caller k passes i = k, k + concurrency, k + 2 * concurrency, ... (an index into its
    requests).

    Returns:
        (calls per second over all threads, each call's latency in seconds).
    """
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def caller(k: int) -> None:
        mine, i = [], k
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            call(i)
            mine.append(time.perf_counter() - t)
            i += concurrency
        with lock:
            latencies.extend(mine)

    with futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(caller, range(concurrency)))
    return len(latencies) / (time.perf_counter() - start), latencies
