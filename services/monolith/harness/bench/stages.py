"""Each stage of the loop alone, and the bare JetStream publish rate, in the capacity benchmark's run.

Every figure is a median over `ROUNDS` rounds after a warm-up, on the same machine as the
loop, with the same model and the same synthetic traffic; each stage runs while the others
are idle.

- **Predict** (`predict_alone`): the stack's model-serving, `concurrency` callers calling back
  to back with ranking requests that carry no request_id, so nothing is logged.
- **Impression publishing** (`ImpressionsAlone`): a model-serving process of its own over the
  stack's serving shards and dense-PS, publishing to a NATS server nobody reads; the same
  callers send requests with a request_id. A round's rate is its candidates over the time
  from its first call until the last impression is stored (serving's queue empty and EVENTS
  no longer growing), so a publisher slower than Predict shows.
- **The joiner** (`JoinerAlone`): a NATS server of its own whose EVENTS holds a copy of what
  the loop stored there (impressions and actions, as they were) followed by the impressions
  the impression-publishing stage added on the same server; then a joiner started on it,
  paused (SIGSTOP) as soon as it is up. A round resumes it for a while and reads the samples
  it published from its /metrics. Between its rounds, with the joiner paused, a
  `BarePublisher` on the same server publishes copies of the messages the joiner publishes
  (the loop's SAMPLES messages, same payloads and headers), and copies of impression
  messages: the bare rates, interleaved round by round with the joiner's.
- **The trainer** (`trainer_alone`): an online trainer of its own reading the loop's SAMPLES
  from the start with a durable consumer of its own, over the stack's training shards and
  dense-PS (the stack idle by then). Its rate is samples trained per second over consecutive
  windows, read from its /metrics while a backlog remains.

For a missed bar the capacity benchmark runs a stage again under the sampling profiler
(`profile`: the role's process runs through `monolith.harness.bench.sampling`, SIGUSR1 after
the warm-up so the profile covers the load alone).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from monolith.common.process import RoleProcess, free_port, wait_healthy
from monolith.common.scrape import try_scrape
from monolith.harness.bench.measure import ROUNDS, concurrent_calls, median
from monolith.harness.manifest import StackManifest
from monolith.streams.bare_publish import BarePublisher
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM, StreamsConfig
from monolith.streams.ids import ACTION, parse_message_id
from monolith.streams.nats_server import NatsServer
from monolith.streams.publish import MSG_ID_HEADER
from monolith.streams.reader import StoredMessage
from monolith.streams.transfer import copy_head, head
from monolith.streams.watch import StreamWatch

_LOGGER = logging.getLogger("monolith.harness.bench.stages")

# A ranking request as the generator makes it: (user features, candidate features).
RankingRequest = tuple[dict[str, Any], dict[str, list[Any]]]
TEMPLATES = 1000  # messages copied as the bare publisher's templates
DRAIN_TIMEOUT = 120.0  # seconds a profiled joiner gets to publish its backlog before it is stopped


_STARTED = time.monotonic()


def progress(message: str) -> None:
    """A progress line of the capacity benchmark on stderr, with the seconds since it started."""
    print(f"[bench capacity {time.monotonic() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def metric(url: str, name: str, absent: float = math.nan, **labels: str) -> float:
    """The sum of a metric's series on a /metrics page.

    Args:
        url: the page.
        name: the metric.
        absent: the value when the page has no such series (0 for a labelled counter never
            incremented); an unreadable page is always NaN.
        labels: only series with these labels.
    """
    page = try_scrape(url, timeout=5.0)
    if page is None:
        return math.nan
    return page.sum(name, **labels) if page.has(name, **labels) else absent


@dataclasses.dataclass
class Role:
    """A role process this benchmark started: its address, /metrics, and pausing.

    Attributes:
        process: the process.
        address: its gRPC "host:port" (None for the online trainer, which serves none).
        metrics: its /metrics URL.
        profile: where its sampling profile is written when it exits (None: not profiled).
    """

    process: RoleProcess
    address: str | None
    metrics: str
    profile: str | None = None

    @classmethod
    def start(cls, args: Sequence[str], log: str, grpc: bool = True, profile: str | None = None) -> Role:
        """`monolith <args>` on free loopback ports (under the sampling profiler with `profile`)."""
        port, metrics_port = free_port(), free_port()
        flags = ["--host", "127.0.0.1", "--metrics-port", str(metrics_port)] + (["--port", str(port)] if grpc else [])
        argv = ["--log-level", "WARNING", *args, *flags]
        if profile is None:
            process = RoleProcess(argv, log)
        else:
            process = RoleProcess([profile, *argv], log, module="monolith.harness.bench.sampling")
        return cls(process, f"127.0.0.1:{port}" if grpc else None, f"http://127.0.0.1:{metrics_port}/metrics", profile)

    def pause(self) -> None:
        os.kill(self.process.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.process.pid, signal.SIGCONT)

    def start_profile(self) -> None:
        """The profile covers what runs from now on (start-up and warm-up left out)."""
        if self.profile is not None:
            os.kill(self.process.process.pid, signal.SIGUSR1)

    def stop(self) -> list[str]:
        """Stops it (resumed first, so it can exit cleanly); its profile's lines, if profiled."""
        if self.process.process.poll() is None:
            self.resume()
        # A profiled role writes its profile as it exits: give it time to finish cleanly.
        code = self.process.stop(timeout=15.0 if self.profile is None else 60.0)
        if self.profile is None:
            return []
        try:
            with open(self.profile, encoding="utf-8") as f:
                return list(json.load(f))
        except (OSError, ValueError) as exc:
            return [f"no profile written (the process exited with {code}): {exc}"]


def wait_for_metric(url: str, name: str, ok: Callable[[float], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok(metric(url, name)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {name} at {url} not as expected after {timeout:.0f} s")
        time.sleep(0.2)


class FreshNats:
    """A NATS server of this benchmark's own, with its store under `directory`.

    Its storage limit holds four streams at the default limits (EVENTS, SAMPLES and the two
    bare-publish streams), whatever the disk's free space: the server would otherwise allow 75%
    of it, and refuse to create the fourth stream on a disk with less than about 23 GB free.
    """

    STREAMS = 4

    def __init__(self, directory: str, partitions: int) -> None:
        defaults = StreamsConfig()
        limit = self.STREAMS * max(defaults.events_max_bytes, defaults.samples_max_bytes) + (1 << 30)
        self.server = NatsServer(os.path.join(directory, "nats"), log_path=os.path.join(directory, "nats.log"),
                                 max_store_bytes=limit)  # fmt: skip
        self.partitions = partitions

    @property
    def config(self) -> StreamsConfig:
        return StreamsConfig(url=self.server.url, partitions=self.partitions)

    def __enter__(self) -> FreshNats:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


# ------------------------------------------------------------------------------- Predict


def closed_loop(call: Callable[[RankingRequest, int], object], requests: Sequence[RankingRequest], concurrency: int,
                seconds: float) -> tuple[int, int, float]:  # fmt: skip
    """`call(request, i)` back to back from `concurrency` threads for `seconds`; (calls, candidates, seconds taken)."""
    candidates = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal candidates
        request = requests[i % len(requests)]
        call(request, i)
        with lock:
            candidates += len(request[1]["movie_id"])

    started = time.perf_counter()
    _, latencies = concurrent_calls(one, concurrency, seconds)
    return len(latencies), candidates, time.perf_counter() - started


def predict_alone(client: Any, requests: Sequence[RankingRequest], concurrency: int, seconds: float,
                  rounds: int = ROUNDS) -> dict[str, float]:  # fmt: skip
    """Predict without impressions on the stack's serving: median calls/s and candidates/s over rounds."""
    score = lambda request, i: client.score(*request)  # noqa: E731
    closed_loop(score, requests, concurrency, seconds)  # warm-up
    measured = [closed_loop(score, requests, concurrency, seconds) for _ in range(rounds)]
    return {
        "predict_requests_per_s": median([calls / took for calls, _, took in measured]),
        "predict_candidates_per_s": median([candidates / took for _, candidates, took in measured]),
    }


# ---------------------------------------------------------------------- impressions


class ImpressionsAlone:
    """Predict with impressions logged, on a serving process of its own publishing to `nats`.

    Args:
        stack: the running stack (its serving shards and dense-PS are read).
        nats: a server nobody else reads.
        workdir: for logs and the profile.
        client_factory: makes a MonolithClient for an address.
        profile: run serving under the sampling profiler.
    """

    def __init__(self, stack: StackManifest, nats: FreshNats, workdir: str,
                 client_factory: Callable[[str], Any], profile: bool = False) -> None:  # fmt: skip
        self._stack = stack
        self._nats = nats
        self._workdir = workdir
        self._client_factory = client_factory
        self._profile = profile

    def measure(self, requests: Sequence[RankingRequest], concurrency: int, seconds: float,
                rounds: int = ROUNDS) -> dict[str, Any]:  # fmt: skip
        """Median candidates/s with every impression stored; with `profile`, the profile's lines too."""
        args = ["serving", "--config", self._stack.config, "--embedding-ps", ",".join(self._stack.serving_shards),
                "--dense-ps", self._stack.dense_ps, "--dense-sync-interval", f"{self._stack.sync_interval:g}",
                "--nats", self._nats.server.url, "--partitions", str(self._nats.partitions)]  # fmt: skip
        tag = "profiled-" if self._profile else ""
        profile = os.path.join(self._workdir, "serving-profile.json") if self._profile else None
        role = Role.start(args, os.path.join(self._workdir, f"{tag}impressions-serving.log"), profile=profile)
        watch = StreamWatch(self._nats.config, "bench-capacity-impressions")
        client = None
        try:
            assert role.address is not None
            wait_healthy(role.address, timeout=120.0)
            client = self._client_factory(role.address)
            run = f"imp-{time.monotonic_ns()}-"
            rates: list[float] = []
            dropped = metric(role.metrics, "monolith_serving_impressions_dropped_total")
            for r in range(rounds + 1):  # round 0 warms up
                if r == 1:
                    role.start_profile()

                def logged(request: RankingRequest, i: int, r: int = r) -> None:
                    client.score(*request, request_id=f"{run}{r}-{i}")

                started = time.perf_counter()
                _, sent, _ = closed_loop(logged, requests, concurrency, seconds)
                stored = self._wait_published(role, watch)
                if r:
                    rates.append(sent / (stored - started))
            dropped = metric(role.metrics, "monolith_serving_impressions_dropped_total") - dropped
        finally:
            if client is not None:
                client.close()
            watch.close()
            lines = role.stop()
        out: dict[str, Any] = {"impressions_candidates_per_s": median(rates), "impressions_dropped_alone": dropped}
        if self._profile:
            out["profile"] = lines
        return out

    @staticmethod
    def _wait_published(role: Role, watch: StreamWatch, timeout: float = 60.0) -> float:
        """Waits until serving's impression queue is empty and EVENTS stopped growing.

        Returns:
            The `time.perf_counter()` reading at which EVENTS was first seen holding its final
            count (read every 50 ms; final once unchanged for a quarter of a second).
        """
        poll, quiet = 0.05, 0.25
        deadline = time.monotonic() + timeout
        last, reached = -1, time.perf_counter()
        while time.monotonic() < deadline:
            queued = metric(role.metrics, "monolith_serving_impressions_queued")
            stored = watch.stream_state(EVENTS_STREAM).last_sequence
            now = time.perf_counter()
            if stored != last:
                last, reached = stored, now
            elif (math.isnan(queued) or queued == 0) and now - reached >= quiet:
                return reached
            time.sleep(poll)
        _LOGGER.warning("impressions still being published after %.0f s", timeout)
        return time.perf_counter()


# --------------------------------------------------------------------------- joiner


def is_impression(message: StoredMessage) -> bool:
    """An EVENTS message that is not an action (an impression, or a Predict call's impressions)."""
    key = parse_message_id(message.headers.get(MSG_ID_HEADER, ""))
    return key is None or key.kind != ACTION


class JoinerAlone:
    """A joiner of its own on `nats`, paused except during its rounds; bare publishes in between.

    Load EVENTS first (`copy_loop_events`, and whatever else publishes impressions to the
    server), then `start` it (paused as soon as it answers health checks: a pause must stay
    short, or the joiner's requests to NATS time out and its partitions restart), `measure`,
    `stop`.

    Args:
        stack: the running stack (its streams are copied from; its join settings are used).
        nats: a server of this benchmark's own.
        workdir: for logs and the profile.
        profile: run the joiner under the sampling profiler.
    """

    def __init__(self, stack: StackManifest, nats: FreshNats, workdir: str, profile: bool = False) -> None:
        self._stack = stack
        self._source = stack.streams_config()
        self._nats = nats
        self._profile = profile
        args = ["joiner", "--config", stack.config, "--nats", nats.server.url, "--partitions", str(nats.partitions),
                "--window", f"{stack.join_window:g}", "--lateness", f"{stack.join_lateness:g}"]  # fmt: skip
        self._args = args
        self._log = os.path.join(workdir, f"{'profiled-' if profile else ''}joiner.log")
        self._profile_path = os.path.join(workdir, "joiner-profile.json") if profile else None
        self._role: Role | None = None
        self.events_copied = 0

    def start(self) -> None:
        """Starts the joiner and pauses it once it answers health checks."""
        self._role = Role.start(self._args, self._log, profile=self._profile_path)
        assert self._role.address is not None
        try:
            wait_healthy(self._role.address, timeout=120.0)
        except TimeoutError:
            self._role.stop()
            raise
        self._role.pause()

    def copy_loop_events(self, last_event: int, count: int) -> int:
        """Copies up to `count` of the loop's EVENTS messages (none after `last_event`) to the joiner's server."""
        started = time.monotonic()
        self.events_copied += copy_head(self._source, self._nats.config, EVENTS_STREAM, ">", count, last_event)
        progress(f"joiner alone: {self.events_copied:,} EVENTS messages copied in {time.monotonic() - started:.1f} s")
        return self.events_copied

    def measure(self, seconds: float, bare_seconds: float, rounds: int = ROUNDS) -> dict[str, Any]:
        """Interleaved rounds: the joiner resumed for a while, then bare publishes of its messages' copies.

        A joiner round times `seconds` of it; only rounds in which it was busy to the end and
        did not restart a partition count (`JoinerRound.counts`).

        Returns:
            The joiner's median samples/s and the bare publish rates (copies of the loop's
            SAMPLES messages, and of its impression messages).
        """
        role = self._role
        assert role is not None, "start() first"
        sample_templates = head(self._source, SAMPLES_STREAM, ">", TEMPLATES)
        impression_templates = head(self._source, EVENTS_STREAM, ">", TEMPLATES, keep=is_impression)
        bare = BarePublisher(self._nats.config, "BARE", sample_templates)
        bare_impressions = BarePublisher(self._nats.config, "BAREIMP", impression_templates)
        seen: list[JoinerRound] = []
        bare_rates: list[float] = []
        bare_impression_rates: list[float] = []
        try:
            bare.open()
            bare_impressions.open()
            first = JoinerRound.run(role, min(seconds, 0.5))  # warm-up
            sides: dict[str, Callable[[], None]] = {
                "joiner": lambda: seen.append(JoinerRound.run(role, seconds)),
                "bare": lambda: bare_rates.append(bare.round(bare_seconds)),
                "bare_impressions": lambda: bare_impression_rates.append(bare_impressions.round(bare_seconds)),
            }
            bare.round(bare_seconds), bare_impressions.round(bare_seconds)  # warm-up
            role.start_profile()
            names = list(sides)
            for r in range(rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    sides[name]()
        finally:
            bare.close()
            bare_impressions.close()
        valid = [r for r in seen if r.counts]
        out: dict[str, Any] = {
            "joiner_samples_per_s": median([r.samples_per_s for r in valid]) if valid else math.nan,
            "joiner_rounds": len(valid),
            "joiner_restarts_alone": seen[-1].restarts_total - first.restarts_total if seen else math.nan,
            "joiner_events_loaded": self._loaded(),
            "jetstream_publish_per_s": median(bare_rates),
            "jetstream_publish_impressions_per_s": median(bare_impression_rates),
            "sample_message_bytes": round(bare.message_bytes, 1),
            "impression_message_bytes": round(bare_impressions.message_bytes, 1),
        }
        return out

    def _loaded(self) -> int:
        watch = StreamWatch(self._nats.config, "bench-capacity-joiner")
        try:
            return watch.stream_state(EVENTS_STREAM).messages
        finally:
            watch.close()

    def profile(self, seconds: float) -> list[str]:
        """Profiled: lets the joiner work on its backlog for `seconds` (and drain it), then stops it.

        Returns:
            The sampling profile's lines, from the moment it was resumed.
        """
        assert self._role is not None and self._profile, "start() a JoinerAlone made with profile=True"
        self._role.resume()
        self._role.start_profile()
        time.sleep(seconds)
        return self.stop()

    def stop(self) -> list[str]:
        """Stops the joiner; its profile's lines if profiled.

        A profiled joiner is first left to publish what it has (at most `DRAIN_TIMEOUT` s):
        stopped mid-backlog under the profiler it can outlast any stop timeout, and its
        profile is written only when it exits.
        """
        if self._role is None:
            return []
        if self._profile:
            self._role.resume()
            published = "monolith_joiner_samples_published_total"
            deadline, last = time.monotonic() + DRAIN_TIMEOUT, -1.0
            while time.monotonic() < deadline:
                now = metric(self._role.metrics, published, absent=0.0)
                if now == last:
                    break
                last = now
                time.sleep(1.0)
        return self._role.stop()


@dataclasses.dataclass(frozen=True)
class JoinerRound:
    """One round of the paused joiner: resumed, given `SETTLE` s to pick up again, then timed.

    A pause can outlast a read the joiner had in flight, and the joiner then restarts the
    partition from its snapshot; the settling time lets that happen before the timed part,
    and a round in which the restart count still moved does not count.

    Attributes:
        seconds: the timed part, between the two reads of its /metrics.
        samples_per_s: samples it published per second in it.
        lag: events still unread at its end.
        busy: whether it was still at work at the end: events unread, or samples still being
            published a moment later (one event holds a whole Predict call's candidates, so
            everything may be read while much is left to publish). If not, the backlog ran out
            within the round and its rate understates the joiner.
        restarts: partition restarts during the timed part.
        restarts_total: partition restarts since the joiner started.
    """

    SETTLE = 0.3

    seconds: float
    samples_per_s: float
    lag: float
    busy: bool
    restarts: float
    restarts_total: float

    @property
    def counts(self) -> bool:
        """Whether the round measured the joiner at work: busy to its end, no restart in it."""
        return self.busy and self.restarts == 0

    @classmethod
    def run(cls, role: Role, seconds: float) -> JoinerRound:
        """Resumes the joiner, times `seconds` of it after the settling time, and pauses it again."""
        samples, restarts = "monolith_joiner_samples_published_total", "monolith_joiner_partition_restarts_total"
        lag_metric = "monolith_joiner_consumer_lag_events"
        role.resume()
        try:
            time.sleep(cls.SETTLE)
            r0 = metric(role.metrics, restarts, absent=0.0)
            t0 = time.perf_counter()
            s0 = metric(role.metrics, samples, absent=0.0)
            time.sleep(seconds)
            s1 = metric(role.metrics, samples, absent=0.0)
            t1 = time.perf_counter()
            lag = metric(role.metrics, lag_metric, absent=0.0)
            r1 = metric(role.metrics, restarts, absent=0.0)
            time.sleep(0.1)
            busy = lag > 0 or metric(role.metrics, samples, absent=0.0) > s1
        finally:
            role.pause()
        took = t1 - t0
        return cls(took, (s1 - s0) / took, lag, busy, r1 - r0, r1)


# -------------------------------------------------------------------------- trainer


def trainer_alone(stack: StackManifest, workdir: str, consumer: str, seconds: float, rounds: int = ROUNDS,
                  profile: bool = False) -> dict[str, Any]:  # fmt: skip
    """An online trainer of its own on the loop's SAMPLES, over the stack's (idle) parameter servers.

    It reads the stack's SAMPLES from the first message with a durable consumer of its own
    (`consumer`), so it neither shares nor moves the stack's trainers' position.

    Returns:
        `trainer_samples_per_s`, the median over `rounds` windows of `seconds` that ended with
        a backlog left (after a warm-up window), and how many windows counted.
    """
    args = ["trainer", "--mode", "online", "--config", stack.config, "--nats", stack.nats,
            "--partitions", str(stack.partitions), "--consumer", consumer,
            "--embedding-ps", ",".join(stack.training_shards), "--dense-ps", stack.dense_ps]  # fmt: skip
    tag = "profiled-" if profile else ""
    role = Role.start(args, os.path.join(workdir, f"{tag}trainer.log"), grpc=False,
                      profile=os.path.join(workdir, "trainer-profile.json") if profile else None)  # fmt: skip
    rates: list[float] = []
    try:
        wait_for_metric(role.metrics, "monolith_trainer_ready", lambda v: v == 1, 120.0, "the trainer alone")
        trained = lambda: metric(role.metrics, "monolith_trainer_examples_total", absent=0.0)  # noqa: E731
        time.sleep(seconds)  # warm-up: TensorFlow's first steps, the first lookups
        role.start_profile()
        t0, e0 = time.perf_counter(), trained()
        for _ in range(rounds):
            time.sleep(seconds)
            t1, e1 = time.perf_counter(), trained()
            if not metric(role.metrics, "monolith_trainer_consumer_lag") > 0:
                break  # the backlog ran out within this window
            rates.append((e1 - e0) / (t1 - t0))
            t0, e0 = t1, e1
    finally:
        lines = role.stop()
    out: dict[str, Any] = {"trainer_samples_per_s": median(rates) if rates else math.nan, "trainer_rounds": len(rates)}
    if profile:
        out["profile"] = lines
    return out
