"""Freshness, end to end: from `report_action` to the served score changing.

Each probe takes two users never seen before, a probe and a control, with the same
features otherwise (and the same movie). While neither has a row anywhere, serving reads
their user_id rows as zeros and scores them identically. The probe user then gets an
impression (a Predict with a request_id) and a positive action; the joiner turns them into a
positive sample, the online trainer creates and trains the probe's rows, the train→serve
sync copies them to the serving shards, and from then on the two scores differ. Dense
parameters change for both users alike, so only the probe's own rows can tell them apart.
Freshness is the wall time from the `report_action` call to the first Predict that shows
the difference; after `timeout` the probe counts as a miss.

The comparison Predicts carry no request_id, so they log no impression and train nothing.
Event times are the replay's current event time, never the wall clock.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from monolith.harness.replay.pacing import WindowGate
from monolith.streams.config import partition_of

_LOGGER = logging.getLogger("monolith.harness.replay.probe")

# predict(features, request_id, event_time) -> scores; report(request_id, item_id, event_time).
PredictFn = Callable[[Mapping[str, Any], "str | None", "float | None"], np.ndarray]
ReportFn = Callable[[str, str, float], None]


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """One probe.

    Attributes:
        request_id: the probe impression's request_id.
        item_id: its item.
        seconds: report_action to the changed score, or NaN for a miss (timed out).
    """

    request_id: str
    item_id: str
    seconds: float

    @property
    def missed(self) -> bool:
        return math.isnan(self.seconds)


class FreshnessProbe:
    """Probes every `interval` seconds on a thread of its own, until `stop()`.

    Args:
        predict: scores features through the Predict API.
        report: reports a positive action through the joiner.
        gate: the replay's window gate. A probe's impression and action happen at the
            newest event time the replay has sent, and are in flight like a replayed
            event's, so no later event closes the probe's window before its action.
        partitions: partitions of the streams (the gate is per partition).
        after_stored: runs a callback once the impression of a request_id is on the stream
            (`samples.ImpressionWatch.after_stored`): the probe leaves the gate then.
        user: the fixed user features of both users (user_id is replaced).
        movie: the movie they are scored on: movie_id and genres.
        first_user_id: probe k uses user ids first_user_id + 2k (probe) and + 2k + 1
            (control); pick a range no data and no earlier run uses.
        request_prefix: probe impressions' request_ids are `<prefix><k>`.
        interval: seconds between probe starts.
        timeout: seconds after which a probe is a miss.
        poll: seconds between comparison Predicts.
        clock: monotonic seconds.
    """

    def __init__(self, predict: PredictFn, report: ReportFn, gate: WindowGate, partitions: int,
                 after_stored: Callable[[str, Callable[[], None]], None],
                 user: Mapping[str, Any], movie: Mapping[str, Any], first_user_id: int, request_prefix: str,
                 interval: float = 2.0, timeout: float = 15.0, poll: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._predict = predict
        self._report = report
        self._user = {k: v for k, v in user.items() if k != "user_id"}
        self._movie = dict(movie)
        self._first_user_id = first_user_id
        self._prefix = request_prefix
        self.interval = interval
        self.timeout = timeout
        self.poll = poll
        self._clock = clock
        self._gate = gate
        self._partitions = partitions
        self._after_stored = after_stored
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="freshness-probe", daemon=True)
        self._lock = threading.Lock()
        self._results: list[ProbeResult] = []
        self._impressions: list[tuple[str, str, float]] = []
        self.skipped = 0  # probes abandoned before their action (a failed Predict, unequal scores)
        self._next = 0

    @property
    def item_id(self) -> str:
        return str(self._movie["movie_id"])

    def results(self) -> list[ProbeResult]:
        with self._lock:
            return list(self._results)

    def impressions(self) -> list[tuple[str, str, float]]:
        """(request_id, item_id, label) of every probe impression served: 1.0 if its action went out."""
        with self._lock:
            return list(self._impressions)

    def actions(self) -> int:
        """Positive actions the probes reported."""
        with self._lock:
            return sum(1 for _, _, label in self._impressions if label == 1.0)

    def seconds(self) -> list[float]:
        """Freshness of every finished probe, misses as `timeout` (a lower bound)."""
        return [self.timeout if r.missed else r.seconds for r in self.results()]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops after the probe in progress (abandoned, not counted, if it is still polling)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            try:
                result = self.probe_once()
            except Exception:  # noqa: BLE001 - a probe failing must not end the replay
                _LOGGER.exception("freshness probe failed")
                result = None
            if result is not None:
                with self._lock:
                    self._results.append(result)
            self._stop.wait(max(0.0, self.interval - (self._clock() - started)))

    def _pair(self, k: int) -> dict[str, Any]:
        """Features of [probe, control] for probe k: two examples, everything else broadcast."""
        probe = self._first_user_id + 2 * k
        features: dict[str, Any] = {"user_id": [probe, probe + 1]}
        features.update({name: [value] for name, value in self._user.items()})
        features.update({name: [value] for name, value in self._movie.items()})
        return features

    def probe_once(self) -> ProbeResult | None:
        """One probe; None if it was skipped or stopped before it measured anything."""
        if self._gate.newest is None:
            return None  # the replay has not started: there is no "now" in event time yet
        k, self._next = self._next, self._next + 1
        pair = self._pair(k)
        try:
            before = self._predict(pair, None, None)
        except Exception as exc:  # noqa: BLE001 - the stack may be busy: skip this probe
            _LOGGER.warning("freshness probe %d skipped: %s", k, exc)
            self.skipped += 1
            return None
        if before[0] != before[1]:
            # Two users nothing has seen must score alike; if not, the probe cannot measure.
            _LOGGER.warning("freshness probe %d skipped: fresh users already score differently (%s)", k, before)
            self.skipped += 1
            return None
        partition = partition_of(f"{self._prefix}{k}", self._partitions)
        now = self._gate.enter_newest(partition)
        if now is None:
            return None
        request_id = f"{self._prefix}{k}"
        impressed = False
        try:
            started = self._impression_and_action(k, pair, now)
            impressed = any(r == request_id for r, _, _ in self.impressions())
        finally:
            if impressed:
                self._after_stored(request_id, lambda: self._gate.leave(now, partition))
            else:
                self._gate.leave(now, partition)
        if started is None:
            return None
        while not self._stop.is_set():
            try:
                scores = self._predict(pair, None, None)
                if scores[0] != scores[1]:
                    return ProbeResult(request_id, self.item_id, self._clock() - started)
            except Exception as exc:  # noqa: BLE001 - keep polling through a hiccup
                _LOGGER.debug("freshness poll failed: %s", exc)
            if self._clock() - started >= self.timeout:
                return ProbeResult(request_id, self.item_id, math.nan)
            self._stop.wait(self.poll)
        return None

    def _impression_and_action(self, k: int, pair: Mapping[str, Any], now: float) -> float | None:
        """Probe k's impression and positive action; the clock reading at the action, None if skipped."""
        request_id = f"{self._prefix}{k}"
        single = {name: values[:1] for name, values in pair.items()}
        try:
            self._predict(single, request_id, now)
        except Exception as exc:  # noqa: BLE001
            _LOGGER.warning("freshness probe %d skipped: its impression failed: %s", k, exc)
            self.skipped += 1
            return None
        started = self._clock()
        try:
            self._report(request_id, self.item_id, now)
        except Exception as exc:  # noqa: BLE001 - its impression stays, a negative now
            _LOGGER.warning("freshness probe %d skipped: report_action failed: %s", k, exc)
            with self._lock:
                self._impressions.append((request_id, self.item_id, 0.0))
            self.skipped += 1
            return None
        with self._lock:
            self._impressions.append((request_id, self.item_id, 1.0))
        return started
