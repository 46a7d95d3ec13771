"""The whole loop under synthetic traffic: filling the tables, steps at a request rate, exactly once.

The capacity benchmark's side of a running stack (`monolith up`), through its public APIs
only: Predict and ReportActions through the Python client, the stack's /metrics, and the
streams' state through `monolith.streams`.

- `fill_tables`: the batch stage over the world's history, as the replay's batch stage trains.
- `Traffic`: request k of the world, sent as a backend would (Predict with a request_id, then
  the clicks drawn for it reported in one ReportActions call), paced open-loop at a rate.
- `run_step` / `search`: one step of traffic with the backlogs read throughout and freshness
  probed alongside, judged by `pace.missed_pace`; the search steps at the rates
  `pace.RateSearch` picks, letting backlogs drain between steps.
- `reconcile_samples`: closes every join window and reconciles SAMPLES with what the
  traffic must have produced (`replay.bookkeeping`).
"""

from __future__ import annotations

import logging
import math
import resource
import threading
import time
from concurrent import futures
from typing import Any

from monolith.common.scrape import try_scrape
from monolith.controller.client import ControllerClient
from monolith.dense_ps.client import DensePSClient
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.harness.bench import pace
from monolith.harness.bench.load import FreshnessUnderLoad
from monolith.harness.bench.stages import RankingRequest, metric, progress
from monolith.harness.bench.synthetic import SyntheticWorld
from monolith.harness.manifest import StackManifest
from monolith.harness.replay.bookkeeping import expected_samples, reconcile
from monolith.harness.replay.pacing import Pacer
from monolith.harness.replay.samples import SampleLog, closing_time, watermark_request_ids
from monolith.harness.stack.parts import serving_shard, training_shard
from monolith.model.config import load_model_config
from monolith.streams.config import EVENTS_STREAM, SAMPLES_STREAM
from monolith.streams.watch import StreamWatch
from monolith.trainer.batch import train_pass
from monolith.trainer.worker import TrainerWorker
from monolith_client import MonolithClient

_LOGGER = logging.getLogger("monolith.harness.bench.loop")

SEED_BATCH = 2048  # examples per step of the table-filling batch stage (the model's own 256 takes ~2x longer)
WORKERS = 8  # generator threads; calls in flight at most twice this
PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 10.0  # a miss counts at this, over the 5 s bar
READ_INTERVAL = 0.5  # seconds between backlog readings in a step



# ------------------------------------------------------------------------- traffic


class Traffic:
    """The world's requests through the stack: Predict with a request_id, then the clicks.

    Request k is `world.request(k)`, sent as request_id `<prefix><k>`; what happened to each
    is kept (answered, clicks reported), and the rest follows from the world and k.

    Args:
        world: the synthetic population.
        client: a MonolithClient with the joiner's address.
        prefix: this run's request_id prefix.
        workers: threads sending requests.
    """

    def __init__(self, world: SyntheticWorld, client: MonolithClient, prefix: str, workers: int = WORKERS) -> None:
        self.world = world
        self.prefix = prefix
        self.client = client
        self._workers = workers
        self._lock = threading.Lock()
        self.next_index = 0
        self.answered: dict[int, bool] = {}  # k -> its clicks were reported (or it had none)
        self.predict_errors = 0
        self.action_errors = 0

    def features(self, k: int) -> RankingRequest:
        request = self.world.request(k)
        return self.world.user_features(request.user), self.world.candidate_features(request.items)

    def _one(self, k: int) -> int:
        """Request k; the candidates it ranked (0 if Predict failed)."""
        request = self.world.request(k)
        request_id = f"{self.prefix}{k}"
        try:
            self.client.score(self.world.user_features(request.user), self.world.candidate_features(request.items),
                               request_id=request_id)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - counted: a failed call fails the step
            _LOGGER.debug("Predict %s failed: %s", request_id, exc)
            with self._lock:
                self.predict_errors += 1
            return 0
        reported = True
        clicked = request.clicked
        if clicked.shape[0]:
            try:
                self.client.report_actions([(request_id, int(item)) for item in clicked])
            except Exception as exc:  # noqa: BLE001 - its candidates become negatives
                _LOGGER.debug("ReportActions %s failed: %s", request_id, exc)
                reported = False
                with self._lock:
                    self.action_errors += 1
        with self._lock:
            self.answered[k] = reported
        return len(request)

    def run(self, rate: float, seconds: float) -> tuple[int, int, int, float, range]:
        """Sends requests at `rate`/s for `seconds` (calls in flight bounded by 2 x workers).

        Returns:
            (calls answered, candidates they ranked, calls failed, seconds until the last
            answered, the request indices used).
        """
        first = self.next_index
        errors_before = self.predict_errors
        in_flight = threading.BoundedSemaphore(2 * self._workers)
        pacer = Pacer(rate)
        done: list[int] = []
        pool = futures.ThreadPoolExecutor(self._workers, thread_name_prefix="capacity-traffic")
        try:
            for i in range(int(rate * seconds)):
                pacer.wait_for(i)
                in_flight.acquire()
                k, self.next_index = self.next_index, self.next_index + 1
                future = pool.submit(self._one, k)
                future.add_done_callback(lambda f: (done.append(f.result()), in_flight.release()))
        finally:
            pool.shutdown(wait=True)
        took = time.monotonic() - pacer.start
        answered = [c for c in done if c]
        return len(answered), sum(answered), self.predict_errors - errors_before, took, range(first, self.next_index)

    def impressions(self, indices: range) -> list[tuple[str, str, float]]:
        """(request_id, item_id, label) of every candidate of the answered requests among `indices`."""
        out = []
        for k in indices:
            reported = self.answered.get(k)
            if reported is None:
                continue
            request = self.world.request(k)
            request_id = f"{self.prefix}{k}"
            out += [(request_id, str(int(item)), 1.0 if click and reported else 0.0)
                    for item, click in zip(request.items, request.clicks)]  # fmt: skip
        return out


# --------------------------------------------------------------------- the stack


class StackView:
    """What the benchmark reads from the running stack: backlogs, stream growth, drops, rows."""

    def __init__(self, stack: StackManifest) -> None:
        self.stack = stack
        self.streams = stack.streams_config()
        self._watch = StreamWatch(self.streams, "bench-capacity")

    def joiner_lag(self) -> float:
        return metric(self.stack.metrics["joiner"], "monolith_joiner_consumer_lag_events")

    def trainer_backlog(self) -> float:
        try:
            state = self._watch.consumer_state(SAMPLES_STREAM, self.stack.trainer_consumer)
        except Exception as exc:  # noqa: BLE001 - one unreadable reading is left out
            _LOGGER.debug("trainer backlog unreadable: %s", exc)
            return math.nan
        return math.nan if state is None else float(state.pending + state.ack_pending)

    def dropped(self) -> float:
        return metric(self.stack.metrics["serving"], "monolith_serving_impressions_dropped_total")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each of the stack's processes that export them, and by this one."""
        out = {}
        for part, url in self.stack.metrics.items():
            used = metric(url, "process_cpu_seconds_total")
            if not math.isnan(used):
                out[part] = used
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["generator"] = usage.ru_utime + usage.ru_stime
        return out

    def last_sequence(self, stream: str) -> int:
        return self._watch.stream_state(stream).last_sequence

    def rows(self, role: str) -> dict[str, float]:
        """Rows per table summed over the role's shards ({} if unreadable)."""
        names = [training_shard(i) if role == "training" else serving_shard(i)
                 for i in range(len(self.stack.training_shards))]  # fmt: skip
        out: dict[str, float] = {}
        for name in names:
            page = try_scrape(self.stack.metrics[name])
            if page is None:
                continue
            for table, rows in page.by_label("monolith_embedding_rows", "table").items():
                out[table] = out.get(table, 0.0) + rows
        return out

    def close(self) -> None:
        self._watch.close()


def fill_tables(stack: StackManifest, world: SyntheticWorld) -> dict[str, Any]:
    """The batch stage: one pass over the world's history (every user once), then a checkpoint."""
    config = load_model_config(stack.config)
    config = config.model_copy(update={"training": config.training.model_copy(update={"batch_size": SEED_BATCH})})
    history = world.history(start_time=time.time() - 2 * 86_400, span=86_400)
    progress(f"batch stage: {len(history):,} examples (every one of {world.shape.users:,} users once)")
    started = time.monotonic()
    with ShardedEmbeddingClient(list(stack.training_shards), config.table_dims(),
                                occurrence_tables=config.occurrence_tables()) as sparse, \
            DensePSClient(stack.dense_ps) as dense:  # fmt: skip
        worker = TrainerWorker(config, sparse, dense)
        try:
            summary = train_pass(worker, history, 0, 1, threading.Event())
        finally:
            worker.close()
    seconds = time.monotonic() - started
    if stack.controller is not None:
        with ControllerClient(stack.controller, timeout=300.0) as controller:
            controller.checkpoint()
    return {"batch_examples": summary["examples"], "batch_seconds": round(seconds, 1),
            "batch_running_auc": round(summary["running_auc"], 4)}  # fmt: skip


def wait_until_served(view: StackView, timeout: float) -> None:
    """Until the serving shards hold as many rows as the training shards (the first sync is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        training, serving = sum(view.rows("training").values()), sum(view.rows("serving").values())
        if training and serving >= training:
            return
        time.sleep(1.0)
    progress(f"serving shards still behind the training shards after {timeout:.0f} s; going on")


# ---------------------------------------------------------------------- the search


class Probes:
    """Freshness probes every PROBE_INTERVAL s throughout the search; each step takes those that finished in it."""

    def __init__(self, stack: StackManifest, prefix: str) -> None:
        self._client = MonolithClient(stack.serving, joiner_address=stack.joiner, timeout=5.0)
        self._probe = FreshnessUnderLoad(self._client, prefix, PROBE_INTERVAL, PROBE_TIMEOUT)
        self._taken = 0

    def start(self) -> None:
        self._probe.start()

    def take(self) -> list[float]:
        """The probes finished since the last call (a miss at the timeout)."""
        seconds = list(self._probe.seconds)
        new, self._taken = seconds[self._taken :], len(seconds)
        return [PROBE_TIMEOUT if math.isnan(s) else s for s in new]

    def stop(self) -> None:
        self._probe.stop()
        self._client.close()


def run_step(
    traffic: Traffic, view: StackView, probes: Probes, rate: float, seconds: float
) -> tuple[pace.StepFigures, range, dict[str, float]]:
    """One step of traffic at `rate` with the backlogs read throughout.

    Returns:
        The step's figures, the request indices it used, and the share of a core each of the
        stack's processes (and this one, the generator) used over the step.
    """
    joiner: list[float] = []
    trainer: list[float] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            joiner.append(view.joiner_lag())
            trainer.append(view.trainer_backlog())
            stop.wait(READ_INTERVAL)

    dropped, events, samples = view.dropped(), view.last_sequence(EVENTS_STREAM), view.last_sequence(SAMPLES_STREAM)
    probes.take()
    cpu, wall = view.cpu_seconds(), time.monotonic()
    reader = threading.Thread(target=read, name="capacity-backlogs", daemon=True)
    reader.start()
    answered, candidates, errors, took, indices = traffic.run(rate, seconds)
    stop.set()
    reader.join()
    elapsed = time.monotonic() - wall
    cpu_share = {
        part: round((used - cpu.get(part, math.nan)) / elapsed, 3) for part, used in view.cpu_seconds().items()
    }
    figures = pace.StepFigures(
        target_rps=rate,
        seconds=took,
        requests=answered,
        candidates=candidates,
        predict_errors=errors,
        impressions_dropped=view.dropped() - dropped,
        events_per_s=(view.last_sequence(EVENTS_STREAM) - events) / took,
        samples_per_s=(view.last_sequence(SAMPLES_STREAM) - samples) / took,
        joiner_lag=joiner,
        trainer_backlog=trainer,
        freshness_s=probes.take(),
    )
    return figures, indices, cpu_share


def drain(view: StackView, figures: pace.StepFigures, timeout: float) -> float:
    """Waits (bounded) until the backlogs are under a second of the last step's traffic; seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if view.joiner_lag() <= figures.events_per_s and view.trainer_backlog() <= figures.samples_per_s:
            break
        time.sleep(READ_INTERVAL)
    return time.monotonic() - started


def search(traffic: Traffic, view: StackView, probes: Probes, rates: pace.RateSearch, step_seconds: float,
           drain_seconds: float) -> tuple[list[dict[str, Any]], list[range]]:  # fmt: skip
    """Steps at the rates `rates` picks (recording each outcome in it).

    Returns:
        Each step's row, and the request indices of the steps in which serving dropped no
        impression (the ones whose samples can be reconciled).
    """
    rows: list[dict[str, Any]] = []
    clean: list[range] = []
    while (rate := rates.next_rate()) is not None:
        figures, indices, cpu_share = run_step(traffic, view, probes, rate, step_seconds)
        reasons = pace.missed_pace(figures)
        rates.record(rate, not reasons)
        if figures.impressions_dropped == 0:
            clean.append(indices)
        waited = drain(view, figures, drain_seconds)
        rows.append({**_step_row(figures, reasons, waited), "cpu_share": cpu_share})
        progress(f"step at {rate:.1f} requests/s: {figures.achieved_rps:.1f} sent, {figures.candidates_per_s:,.0f} "
             f"candidates/s; {'kept pace' if not reasons else 'missed: ' + '; '.join(reasons)}")  # fmt: skip
    return rows, clean


def _step_row(f: pace.StepFigures, reasons: list[str], drained_s: float) -> dict[str, Any]:
    return {
        "target_rps": round(f.target_rps, 2),
        "requests_per_s": round(f.achieved_rps, 2),
        "candidates_per_s": round(f.candidates_per_s, 1),
        "events_per_s": round(f.events_per_s, 1),
        "samples_per_s": round(f.samples_per_s, 1),
        "joiner_lag_growth": round(f.joiner_lag_growth, 1),
        "trainer_backlog_growth": round(f.trainer_backlog_growth, 1),
        "trainer_backlog_median": round(pace.percentile([v for v in f.trainer_backlog if not math.isnan(v)], 50), 1),
        "impressions_dropped": f.impressions_dropped,
        "predict_errors": f.predict_errors,
        "freshness_p99_s": round(f.freshness_p99_s, 3),
        "freshness_probes": len(f.freshness_s),
        "kept_pace": not reasons,
        "missed": reasons,
        "implicates": pace.implicated(f),
        "drained_s": round(drained_s, 1),
    }


# ------------------------------------------------------------------ exactly once


def reconcile_samples(traffic: Traffic, view: StackView, clean: list[range], rate: float,
                      timeout: float) -> dict[str, Any]:  # fmt: skip
    """Closes every join window, reads SAMPLES back and counts this run's samples against the expected ones."""
    stack = view.stack
    close_at = closing_time(time.time(), stack.join_window, stack.join_lateness)
    user, candidates = traffic.features(0)
    for request_id in watermark_request_ids(f"{traffic.prefix}wm-", stack.partitions):
        traffic.client.score(user, candidates, request_id=request_id, event_time=close_at)
    impressions = [i for indices in clean for i in traffic.impressions(indices)]
    expected = expected_samples(impressions, rate)
    log = SampleLog(view.streams, f"{traffic.prefix}")
    log.start()
    progress(f"reading SAMPLES back: {len(expected):,} samples expected from {len(impressions):,} candidates")
    deadline, last_count, last_change = time.monotonic() + timeout, -1, time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last_change < 20.0:
            count, _ = log.counts()
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            if count >= len(expected) and log.caught_up():
                break
            time.sleep(1.0)
        samples = [s for s in log.samples() if not s[0][0].startswith(f"{traffic.prefix}wm-")]
    finally:
        log.close()
    counts = reconcile(expected, samples)
    return {
        "candidates_impressed": len(impressions),
        "samples_expected": counts.expected,
        "samples_joined": counts.joined,
        "samples_lost": counts.lost,
        "samples_duplicated": counts.duplicated,
        "samples_unexpected": counts.unexpected,
        "samples_mislabeled": counts.mislabeled,
    }
