"""Whether the loop kept pace with one step of traffic, and which request rate to try next.

Plain computation on figures the capacity benchmark reads from the stack, tested without one.

A step is traffic at one target rate for a fixed time. The loop kept pace when all of these hold:
- the generator sent at least `MIN_ACHIEVED` of the target rate (a loop that answers slowly
  holds back an open-loop generator whose calls in flight are bounded);
- no Predict failed, and model-serving dropped no impression;
- the joiner's consumer lag and the trainers' backlog did not grow by more than one second of
  the step's traffic (events for the joiner, samples for the trainers). Both are compared as
  the median of the first and of the last few readings, so one checkpoint pause or
  garbage-collector stall at the step's edge does not decide the step;
- train-to-serve freshness p99 over the probes that finished in the step is at most
  `FRESHNESS_P99_S` (a probe that timed out counts at its timeout), and at least one finished.

`RateSearch` doubles the rate from a start until a step fails (or halves it until one
passes), then bisects, geometrically, between the highest rate that kept pace and the lowest
that did not, until they are within `resolution` of each other or the steps run out.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

MIN_ACHIEVED = 0.95
FRESHNESS_P99_S = 5.0
EDGE_READINGS = 4  # readings at each end of a step whose median stands for that end


@dataclasses.dataclass(frozen=True)
class StepFigures:
    """What one step of traffic did.

    Attributes:
        target_rps: the requests/s asked of the generator.
        seconds: how long the step's traffic ran.
        requests: Predict calls that answered.
        candidates: candidates those calls ranked.
        predict_errors: Predict calls that failed.
        impressions_dropped: model-serving's dropped impressions over the step.
        events_per_s: messages stored on EVENTS per second over the step (impressions and actions).
        samples_per_s: messages stored on SAMPLES per second over the step.
        joiner_lag: the joiner's consumer lag (events), read every fraction of a second.
        trainer_backlog: samples not yet trained (not delivered or not acknowledged), likewise.
        freshness_s: the freshness of each probe that finished in the step (a miss at its timeout).
    """

    target_rps: float
    seconds: float
    requests: int
    candidates: int
    predict_errors: int
    impressions_dropped: float
    events_per_s: float
    samples_per_s: float
    joiner_lag: Sequence[float]
    trainer_backlog: Sequence[float]
    freshness_s: Sequence[float]

    @property
    def achieved_rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def candidates_per_s(self) -> float:
        return self.candidates / self.seconds if self.seconds > 0 else 0.0

    @property
    def joiner_lag_growth(self) -> float:
        return growth(self.joiner_lag)

    @property
    def trainer_backlog_growth(self) -> float:
        return growth(self.trainer_backlog)

    @property
    def freshness_p99_s(self) -> float:
        return percentile(self.freshness_s, 99)


def growth(readings: Sequence[float]) -> float:
    """How much a backlog grew over a step: median of the last few readings minus that of the first few.

    NaN readings (a metric that could not be read) are left out; NaN if none is left at an end.
    """
    values = [v for v in readings if not math.isnan(v)]
    if not values:
        return math.nan
    edge = max(1, min(EDGE_READINGS, len(values) // 2))
    return statistics.median(values[-edge:]) - statistics.median(values[:edge])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def missed_pace(step: StepFigures) -> list[str]:
    """Why the loop did not keep pace in this step; empty if it did."""
    reasons = []
    if step.achieved_rps < MIN_ACHIEVED * step.target_rps:
        reasons.append(f"the generator sent {step.achieved_rps:.1f} requests/s of the {step.target_rps:.1f} asked "
                       f"(Predict answered too slowly for the calls in flight)")  # fmt: skip
    if step.predict_errors:
        reasons.append(f"{step.predict_errors} Predict calls failed")
    if not step.impressions_dropped == 0:  # NaN (unreadable) is not a pass either
        reasons.append(f"model-serving dropped {step.impressions_dropped:g} impressions")
    joiner, trainer = step.joiner_lag_growth, step.trainer_backlog_growth
    if not joiner <= step.events_per_s:
        reasons.append(f"the joiner's lag grew by {joiner:,.0f} events, more than one second of traffic "
                       f"({step.events_per_s:,.0f} events/s)")  # fmt: skip
    if not trainer <= step.samples_per_s:
        reasons.append(f"the trainers' backlog grew by {trainer:,.0f} samples, more than one second of traffic "
                       f"({step.samples_per_s:,.0f} samples/s)")  # fmt: skip
    if not step.freshness_s:
        reasons.append("no freshness probe finished")
    elif not step.freshness_p99_s <= FRESHNESS_P99_S:
        reasons.append(f"freshness p99 {step.freshness_p99_s:.3f} s > {FRESHNESS_P99_S:g} s "
                       f"over {len(step.freshness_s)} probes")  # fmt: skip
    return reasons


def implicated(step: StepFigures) -> str | None:
    """The stage a step that missed pace points at most: the one furthest over its threshold.

    "serving" for a generator held back (Predict answering slowly), failed calls or dropped
    impressions; "joiner" for its lag; "trainer" for its backlog or for freshness (what the
    probe waits for once its sample exists is the trainer's step and the sync after it).
    None if the step kept pace.
    """
    if not missed_pace(step):
        return None
    scores = {"serving": 0.0, "joiner": 0.0, "trainer": 0.0}
    if step.predict_errors or not step.impressions_dropped == 0:
        scores["serving"] = math.inf
    elif step.achieved_rps < MIN_ACHIEVED * step.target_rps:
        scores["serving"] = step.target_rps / max(step.achieved_rps, 1e-9)
    if not step.joiner_lag_growth <= step.events_per_s:
        scores["joiner"] = step.joiner_lag_growth / max(step.events_per_s, 1e-9)
    if not step.trainer_backlog_growth <= step.samples_per_s:
        scores["trainer"] = step.trainer_backlog_growth / max(step.samples_per_s, 1e-9)
    if step.freshness_s and step.freshness_p99_s > FRESHNESS_P99_S:
        scores["trainer"] = max(scores["trainer"], step.freshness_p99_s / FRESHNESS_P99_S)
    best = max(scores, key=lambda stage: scores[stage])
    return best if scores[best] > 0 else "trainer"  # no probe finished: freshness unknown


class RateSearch:
    """The next request rate to try, from the steps so far.

    Args:
        start: the first rate (requests/s).
        resolution: stop once the lowest failing rate is within this factor above the
            highest passing one (0.25: 25%).
        max_steps: steps at most.
        floor: do not go below this rate when halving.
        ceiling: do not go above this rate when doubling (e.g. what Predict alone sustains).
    """

    def __init__(self, start: float, resolution: float = 0.25, max_steps: int = 8, floor: float = 0.25,
                 ceiling: float = math.inf) -> None:  # fmt: skip
        if not 0 < floor <= start <= ceiling:
            raise ValueError(f"need 0 < floor <= start <= ceiling, got {floor}, {start}, {ceiling}")
        if resolution <= 0 or max_steps < 1:
            raise ValueError(f"need resolution > 0 and max_steps >= 1, got {resolution} and {max_steps}")
        self.start = start
        self.resolution = resolution
        self.max_steps = max_steps
        self.floor = floor
        self.ceiling = ceiling
        self.tried: list[tuple[float, bool]] = []

    @property
    def best(self) -> float | None:
        """The highest rate that kept pace; None if none did."""
        passed = [rate for rate, kept in self.tried if kept]
        return max(passed) if passed else None

    @property
    def lowest_failure(self) -> float | None:
        failed = [rate for rate, kept in self.tried if not kept]
        return min(failed) if failed else None

    def record(self, rate: float, kept: bool) -> None:
        self.tried.append((rate, kept))

    def next_rate(self) -> float | None:
        """The rate of the next step; None when the search is done."""
        if len(self.tried) >= self.max_steps:
            return None
        if not self.tried:
            return self.start
        best, failure = self.best, self.lowest_failure
        if failure is None:  # everything passed: double, up to the ceiling
            if best >= self.ceiling:
                return None
            return min(2 * best, self.ceiling)
        if best is None:  # everything failed: halve, down to the floor
            if failure <= self.floor:
                return None
            return max(failure / 2, self.floor)
        if failure <= best * (1 + self.resolution):
            return None
        return math.sqrt(best * failure)
