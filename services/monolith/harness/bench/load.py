"""`monolith bench load`: Locust against the local stack, with freshness probed under the load.

Starts `monolith up` on free ports in a temporary data directory and runs the load test of
`clients/locust` headless against it (20 users ranking 100 MovieLens candidates each call, a
click reported for 10% of the calls) for `DURATION` seconds after a warm-up. While it runs:
model-serving's resident memory is sampled from its /metrics (`process_resident_memory_bytes`)
and the replay's freshness probe (report_action to the served score changing) runs alongside.

Reports Predict's throughput and latency percentiles (Locust's, over the whole run), the
error ratio over every call, model-serving's RSS growth from the end of the warm-up to its
peak, and freshness p50/p99 under load (a probe that times out counts at the timeout), with
the joiner's and trainers' backlogs at the end: each Predict logs one impression per
candidate, so the load also tests how far the loop keeps up. `bars_met` checks exactly the issue's bars:
error_ratio == 0, rss_growth_ratio <= 1.1, p99_ms <= 4 * p50_ms, impressions_dropped == 0,
freshness_p99_s <= 5; for a missed bar, `limits`
holds the figures that bear on it.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from monolith.common.scrape import scrape
from monolith.harness.manifest import StackManifest
from monolith.harness.replay.launcher import LocalStack

_LOGGER = logging.getLogger("monolith.harness.bench.load")

USERS = 20
SPAWN_RATE = 10.0
CANDIDATES = 100
ACTION_SHARE = 0.1
DURATION = 300.0  # seconds of load after the warm-up (the 5 minutes)
WARMUP = 30.0  # seconds of load before memory is baselined and freshness probed
QUICK_DURATION = 30.0
QUICK_WARMUP = 10.0
PROBE_USER_BASE = 50_000_000  # user ids no data set and no load user has
PROBE_TIMEOUT = 15.0

BARS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "error_ratio==0": lambda r: r["error_ratio"] == 0,
    "rss_growth_ratio<=1.1": lambda r: r["rss_growth_ratio"] <= 1.1,
    "p99_ms<=4*p50_ms": lambda r: r["p99_ms"] <= 4 * r["p50_ms"],
    "impressions_dropped==0": lambda r: r["impressions_dropped"] == 0,
    "freshness_p99_s<=5": lambda r: r["freshness_p99_s"] <= 5.0,
}


def locustfile() -> Path:
    """clients/locust/locustfile.py: beside the source tree, or where the image puts it ($MONOLITH_LOCUSTFILE wins)."""
    candidates = [
        os.environ.get("MONOLITH_LOCUSTFILE", ""),
        str(Path(__file__).resolve().parents[4] / "clients" / "locust" / "locustfile.py"),
        "/opt/monolith/locust/locustfile.py",
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    raise FileNotFoundError(f"no locustfile at any of {[c for c in candidates if c]} (set MONOLITH_LOCUSTFILE)")


def metric_sum(metrics_url: str, name: str) -> float:
    """The sum of every series of metric `name` on a /metrics page (labels ignored).

    Raises:
        ValueError: the page has no such series.
        OSError: the page could not be fetched.
    """
    page = scrape(metrics_url)
    if not page.has(name):
        raise ValueError(f"{metrics_url} has no {name}")
    return page.sum(name)


def resident_bytes(metrics_url: str) -> float:
    """A process's RSS from its /metrics (prometheus_client's process collector)."""
    return metric_sum(metrics_url, "process_resident_memory_bytes")


def _loop_figures(info: StackManifest) -> dict[str, float]:
    """How far the loop kept up with the load, from the parts' /metrics: impressions published
    and dropped by model-serving, events the joiner has not read, samples it published, and
    samples the trainers have not been given or trained."""
    figures = {}
    for key, part, name in (
        ("joiner_backlog_events", "joiner", "monolith_joiner_consumer_lag_events"),
        ("trainer_backlog_samples", "trainer", "monolith_trainer_consumer_lag"),
        ("impressions_published", "serving", "monolith_serving_impressions_published_total"),
        ("impressions_dropped", "serving", "monolith_serving_impressions_dropped_total"),
        ("samples_published", "joiner", "monolith_joiner_samples_published_total"),
        ("examples_trained", "trainer", "monolith_trainer_examples_total"),
    ):
        try:
            figures[key] = metric_sum(info.metrics[part], name)
        except (KeyError, OSError, ValueError) as exc:
            _LOGGER.warning("no %s: %s", key, exc)
            figures[key] = math.nan
    return figures


class _Sampler:
    """Calls `read` every `interval` seconds on a thread until stopped; keeps the values."""

    def __init__(self, read: Callable[[], float], interval: float = 1.0) -> None:
        self.values: list[float] = []
        self._read = read
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.values.append(self._read())
            except (OSError, ValueError) as exc:
                _LOGGER.warning("RSS sample failed: %s", exc)
            self._stop.wait(self._interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class FreshnessUnderLoad:
    """Probes train-to-serve freshness every `interval` seconds on a thread of its own.

    The replay's probe (replay/probe.py) works the same way but in the replay's event time,
    behind its window gate; under Locust every event carries the servers' clock, so this
    one simply uses the wall clock. Each probe takes two users nothing has seen, a probe and
    a control with the same other features: they score alike until the probe user's
    impression and click have gone through the joiner, the online trainer and the sync to
    the serving shards. Freshness is the time from the report_action call to the first
    Predict that scores them differently; after `timeout` it is a miss.

    Args:
        client: a MonolithClient with a joiner address.
        prefix: request_id prefix of the probes' impressions.
        interval: seconds between probe starts.
        timeout: seconds after which a probe is a miss.
    """

    USER = {"age": "25-34", "gender": "F", "occupation": "engineer", "zip": "941"}
    MOVIE = {"movie_id": 50, "genres": ["Action", "Adventure", "Romance", "Sci-Fi", "War"]}

    def __init__(self, client: Any, prefix: str, interval: float = 2.0, timeout: float = PROBE_TIMEOUT) -> None:
        self._client = client
        self._prefix = prefix
        self.interval = interval
        self.timeout = timeout
        self.seconds: list[float] = []  # one per finished probe; NaN for a miss
        self.skipped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="freshness-under-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        k = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                result = self.probe_once(k)
            except Exception as exc:  # noqa: BLE001 - a busy stack skips a probe, it does not end the benchmark
                _LOGGER.warning("freshness probe %d skipped: %s", k, exc)
                result = None
            if result is None:
                self.skipped += 1
            else:
                self.seconds.append(result)
            k += 1
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def probe_once(self, k: int) -> float | None:
        """One probe: its freshness in seconds, NaN for a miss, None if it could not measure."""
        user_id = PROBE_USER_BASE + 2 * k
        pair = {"user_id": [user_id, user_id + 1], **{n: [v] for n, v in {**self.USER, **self.MOVIE}.items()}}
        before = self._client.predict(pair)
        if before[0] != before[1]:
            return None  # two unseen users must score alike, or the probe cannot tell
        request_id = f"{self._prefix}{k}"
        single = {name: values[:1] for name, values in pair.items()}
        self._client.predict(single, request_id)  # the probe user's impression
        started = time.monotonic()
        self._client.report_action(request_id, self.MOVIE["movie_id"])
        while not self._stop.is_set():
            scores = self._client.predict(pair)
            if scores[0] != scores[1]:
                return time.monotonic() - started
            if time.monotonic() - started >= self.timeout:
                return math.nan
            self._stop.wait(0.05)
        return None


def _locust(info: StackManifest, out: Path, run_time: float) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "locust", "--locustfile", str(locustfile()), "--headless", "--only-summary",
        "--host", info.serving, "--joiner", info.joiner,
        "--users", str(USERS), "--spawn-rate", str(SPAWN_RATE), "--run-time", f"{int(run_time)}s", "--stop-timeout", "10",
        "--candidates", str(CANDIDATES), "--action-share", str(ACTION_SHARE),
        # The bars are judged here; Locust's own gate only must not fail the run for latency.
        "--max-error-ratio", "1", "--max-p95-ms", "1e9", "--exit-code-on-error", "0",
        "--csv", str(out / "locust"),
    ]  # fmt: skip
    log = open(out / "locust.log", "wb")  # noqa: SIM115 - closed by the caller after wait()
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _stats(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "locust_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def _stack_log_tails(info: StackManifest) -> str:
    """The last lines of each stack process's log, for a run that went wrong."""
    tails = []
    for path in sorted(Path(info.logs).glob("*.log")):
        tails.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(tails)


def _failures(out: Path) -> list[str]:
    """Locust's failures, one line each: the call, how often, and the error."""
    try:
        with open(out / "locust_failures.csv", newline="") as f:
            return [f"{row['Name']}: {row['Occurrences']} x {row['Error'][:300]}" for row in csv.DictReader(f)]
    except OSError:
        return []


def _limits(bar: str, r: dict[str, Any]) -> list[str]:
    if bar.startswith("error_ratio"):
        return [f"{r['failures']} of {r['calls']} calls failed:", *r["failed_calls"]]
    if bar.startswith("impressions"):
        return [f"{r['impressions_dropped']:.0f} of {r['impressions_published'] + r['impressions_dropped']:.0f} "
                f"impressions dropped at {r['impressions_per_s']} impressions/s (model-serving's queue full: "
                "NATS publishing slower than Predict)"]  # fmt: skip
    if bar.startswith("freshness"):
        return [f"freshness p50 {r['freshness_p50_s']} s, p99 {r['freshness_p99_s']} s, {r['freshness_misses']} of "
                f"{r['freshness_probes']} probes timed out; at the end the joiner was {r['joiner_backlog_events']:.0f} "
                f"events and the trainers {r['trainer_backlog_samples']:.0f} samples behind"]  # fmt: skip
    if bar.startswith("rss"):
        return [f"model-serving RSS {r['rss_start_mb']} MB after the warm-up, peak {r['rss_peak_mb']} MB, "
                f"{r['rss_end_mb']} MB at the end of {r['duration_s']} s of load"]  # fmt: skip
    return [f"Predict p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms at {r['rps']} calls/s from "
            f"{USERS} users on a machine that also runs the stack's nine processes and Locust"]  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    duration, warmup = (QUICK_DURATION, QUICK_WARMUP) if args.quick else (DURATION, WARMUP)
    with tempfile.TemporaryDirectory(prefix="monolith-bench-load-") as directory:
        out = Path(directory)
        stack = LocalStack(str(out / "stack"), ("--serving-port", "0", "--joiner-port", "0", "--nats-port", "0"))
        info = stack.start(timeout=300)
        try:
            print(f"bench load: {USERS} users for {warmup:g} + {duration:g} s against {info.serving}", file=sys.stderr)
            locust = _locust(info, out, warmup + duration)
            time.sleep(warmup)  # the warm-up is load itself, not a wait for a condition
            rss = _Sampler(lambda: resident_bytes(info.metrics["serving"]))
            rss.start()
            from monolith_client import MonolithClient

            client = MonolithClient(info.serving, joiner_address=info.joiner, timeout=5.0)
            probe = FreshnessUnderLoad(client, f"load-probe-{os.getpid()}-")
            probe.start()
            try:
                code = locust.wait(timeout=warmup + duration + 120)
            except subprocess.TimeoutExpired:
                locust.kill()  # it outlived its run time by two minutes: say so with its log, below
                code = locust.wait()
                stack_logs = _stack_log_tails(info)
                raise RuntimeError(
                    f"Locust did not exit within {warmup + duration + 120:g} s; its log ends:\n"
                    f"{(out / 'locust.log').read_text(errors='replace')[-3000:]}\n{stack_logs}"
                ) from None
            loop = _loop_figures(info)
            probe.stop()
            rss.stop()
            client.close()
            stats = _stats(out)
            failed_calls = _failures(out)
            log_tail = (out / "locust.log").read_text(errors="replace")[-2000:]
        finally:
            stack.stop()
    if code != 0 or "Predict" not in stats:
        raise RuntimeError(f"Locust exited with {code}:\n{log_tail}")
    predict, total = stats["Predict"], stats["Aggregated"]
    freshness = [probe.timeout if math.isnan(s) else s for s in probe.seconds]  # a miss counts at the timeout
    calls, failures = int(total["Request Count"]), int(total["Failure Count"])
    result: dict[str, Any] = {
        "rps": round(float(predict["Requests/s"]), 1),
        "p50_ms": float(predict["50%"]),
        "p95_ms": float(predict["95%"]),
        "p99_ms": float(predict["99%"]),
        "error_ratio": failures / calls if calls else math.nan,
        "calls": calls,
        "failures": failures,
        "failed_calls": failed_calls,
        "actions_rps": round(float(stats.get("ReportActions", {}).get("Requests/s", 0.0)), 1),
        "rss_start_mb": round(rss.values[0] / 2**20, 1),
        "rss_peak_mb": round(max(rss.values) / 2**20, 1),
        "rss_end_mb": round(rss.values[-1] / 2**20, 1),
        "rss_growth_ratio": round(max(rss.values) / rss.values[0], 3),
        "freshness_p50_s": round(float(np.percentile(freshness, 50)), 3) if freshness else math.nan,
        "freshness_p99_s": round(float(np.percentile(freshness, 99)), 3) if freshness else math.nan,
        "freshness_probes": len(freshness),
        "freshness_misses": sum(1 for s in probe.seconds if math.isnan(s)),
        **loop,
        "impressions_per_s": round(float(predict["Requests/s"]) * CANDIDATES, 1),
        "users": USERS,
        "candidates": CANDIDATES,
        "action_share": ACTION_SHARE,
        "warmup_s": warmup,
        "duration_s": duration,
    }
    bars_met = {bar: bool(check(result)) for bar, check in BARS.items()}
    result["bars_met"] = bars_met
    result["limits"] = {bar: _limits(bar, result) for bar, met in bars_met.items() if not met}
    return result
