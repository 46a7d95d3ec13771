"""The replay's stages against a running stack, the live progress line, and the result.

1. Batch stage: one pass over the first 80% by time, trained here by a `TrainerWorker`
   against the stack's training embedding-PS shards and dense-PS (the batch path).
2. Freeze: a copy of that model, taken out of the stack (`frozen`), scores the replayed
   events; the replay starts once model-serving answers as the copy does (the sync has
   caught up), so served and frozen start from the same model.
3. Replay: each later rating in time order, paced at `speed` events/s by a few workers
   (bounded in flight; each event's Predict before its action): a Predict with a request_id
   and the rating's timestamp as event time (the served score is recorded), then its
   action: a click (positive) when the rating is >= 4, else a dislike, an explicit negative
   the joiner decides at once (it is the user's own low rating at that moment). With
   `implicit_negatives` a low rating sends nothing and the joiner's window turns its
   impression into a negative when it closes, as for an impression nobody acted on. The
   freshness probe (`probe`) runs alongside.
4. End: the joiner's windows are closed with one impression per partition far enough
   ahead in event time (`samples`), SAMPLES is read back and reconciled with what was sent,
   and the AUCs (served, frozen, running-mean baseline) are computed over the same events.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import threading
import time
import uuid
from concurrent import futures
from typing import Any, Mapping

import numpy as np

from monolith.common.periodic import PeriodicTask
from monolith.common.scrape import try_scrape
from monolith.controller.client import ControllerClient
from monolith.dense_ps.client import DensePSClient
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import ModelConfig, load_model_config
from monolith.harness.replay import report
from monolith.harness.replay.bookkeeping import (
    ScoreBook,
    auc_of_scored,
    expected_samples,
    mislabeled,
    percentile,
    reconcile,
)
from monolith.harness.replay.frozen import freeze
from monolith.harness.manifest import StackManifest
from monolith.harness.replay.pacing import Pacer, WindowGate
from monolith.harness.replay.probe import FreshnessProbe
from monolith.harness.replay.samples import ImpressionWatch, SampleLog, closing_time, watermark_request_ids
from monolith.harness.replay.traffic import ReplayData, load_replay_data
from monolith.streams.config import partition_of
from monolith.trainer.evaluation import running_mean_scores
from monolith.trainer.batch import train_pass
from monolith.trainer.worker import TrainerWorker
from monolith_client import MonolithClient

_LOGGER = logging.getLogger("monolith.harness.replay")

POSITIVE_KIND = "click"
NEGATIVE_KIND = "dislike"  # one of the joiner's negative kinds (JoinerConfig.negative_kinds)
CATCH_UP_EVENTS = 64  # replayed events compared between serving and the frozen copy before starting
CATCH_UP_TOLERANCE = 1e-4  # probabilities; float32 towers with different batch shapes differ by ~1e-7
PROBE_USER_BASE = 1 << 40  # probe user ids start above every real one (MovieLens has 943 users)
LONG_WINDOW = 600.0  # event-time seconds of join window + lateness worth a warning


@dataclasses.dataclass(frozen=True)
class ReplayOptions:
    """How to replay.

    Attributes:
        speed: events per second (0: as fast as the stack answers).
        limit: use only the first N ratings by time (the last 20% of them are replayed).
        cache_dir: the data cache (default: `monolith.data.movielens.default_cache_dir`).
        plot: where to write the rolling-AUC plot (None: none).
        workers: Predict/report_action workers (events in flight at most 2x this).
        probe_interval: seconds between freshness probes (0: no probe).
        probe_timeout: seconds after which a probe is a miss.
        catch_up_timeout: seconds to wait for serving to answer as the frozen copy does.
        drain_timeout: seconds to wait for the joiner's last samples after the replay.
        quiet_timeout: stop waiting when no sample arrived for this long.
        progress: print the live progress line on stderr.
        implicit_negatives: report nothing for a low rating (the joiner's window makes its
            negative) instead of an explicit negative action.
    """

    speed: float = 100.0
    limit: int | None = None
    cache_dir: str | None = None
    plot: str | None = None
    workers: int = 4
    probe_interval: float = 2.0
    probe_timeout: float = 15.0
    catch_up_timeout: float = 60.0
    drain_timeout: float = 120.0
    quiet_timeout: float = 20.0
    progress: bool = True
    implicit_negatives: bool = False


class StackClients:
    """The product side: Predict through model-serving, actions through the joiner."""

    def __init__(self, stack: StackManifest, timeout: float = 10.0) -> None:
        self.client = MonolithClient(stack.serving, joiner_address=stack.joiner, timeout=timeout, **stack.client_tls())

    def predict(self, features: Mapping[str, Any], request_id: str | None, event_time: float | None) -> np.ndarray:
        return self.client.predict(features, request_id=request_id, event_time=event_time)

    def report(self, request_id: str, item_id: str, event_time: float, positive: bool = True) -> None:
        kind, label = (POSITIVE_KIND, 1.0) if positive else (NEGATIVE_KIND, 0.0)
        self.client.report_action(request_id, item_id=item_id, kind=kind, label=label, event_time=event_time)

    def close(self) -> None:
        self.client.close()


def joiner_outcomes(metrics_url: str, timeout: float = 5.0) -> dict[str, int]:
    """The joiner's event outcomes (late_actions, orphan_actions, ...) summed over partitions.

    Read from its /metrics; empty if unreachable (a figure for the summary only). Counts
    cover the joiner process's life, so other traffic on the same stack is included.
    """
    page = try_scrape(metrics_url, timeout)
    if page is None:
        _LOGGER.debug("joiner metrics at %s unreadable", metrics_url)
        return {}
    return {outcome: int(count) for outcome, count in sorted(page.by_label("monolith_joiner_events", "outcome").items())}


def joiner_quality(metrics_url: str, timeout: float = 5.0) -> dict[str, float]:
    """The served model's quality as the joiner reports it (its last --quality-window samples).

    Read from its /metrics; empty if unreachable. Keys: served_auc, calibration_ratio,
    positive_rate, quality_samples, label_delay_mean_s.
    """
    page = try_scrape(metrics_url, timeout)
    if page is None:
        _LOGGER.debug("joiner metrics at %s unreadable", metrics_url)
        return {}
    figures = {key: page.sum(f"monolith_joiner_{key}")
               for key in ("served_auc", "calibration_ratio", "positive_rate", "quality_samples")}  # fmt: skip
    delays = page.sum("monolith_joiner_label_delay_seconds_count")
    figures["label_delay_mean_s"] = page.sum("monolith_joiner_label_delay_seconds_sum") / delays if delays else math.nan
    return figures


def _say(message: str) -> None:
    print(f"[replay] {message}", file=sys.stderr, flush=True)


class Replay:
    """One replay of MovieLens-100k through a running stack.

    Args:
        stack: where the stack's parts listen.
        options: how to replay.
    """

    def __init__(self, stack: StackManifest, options: ReplayOptions) -> None:
        if options.workers < 1:
            raise ValueError(f"workers must be >= 1, got {options.workers}")
        self.stack = stack
        self.options = options
        self.config: ModelConfig = load_model_config(stack.config)
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = f"replay-{self.run_id}-"
        self._lock = threading.Lock()
        self._done = 0
        self._impressions: list[tuple[str, str, float]] = []
        self._actions = 0
        self._negative_actions = 0
        self._predict_errors = 0
        self._action_errors = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ends the replay early (what was replayed is still reported)."""
        self._stop.set()

    # ------------------------------------------------------------------ stages

    def run(self) -> dict[str, Any]:
        """Runs every stage; returns the result (see `report.SUMMARY_ROWS` for the figures)."""
        data = load_replay_data(self.options.cache_dir, self.options.limit)
        _say(f"{len(data.data):,} ratings: batch stage on the first {len(data.train):,}, replay of the last {len(data):,}")
        clients = StackClients(self.stack)
        samples = SampleLog(self.stack.streams_config(), self.prefix)
        try:
            batch = self._batch_stage(data)
            frozen_scores = batch.pop("frozen_scores")
            batch["frozen_matched_serving"] = self._wait_for_serving(clients, data, frozen_scores)
            samples.start()
            self._warn_about_the_stack(samples)
            replayed = self._replay(clients, data, samples)
            drained = self._drain(clients, data, samples, replayed["probe"])
            lag = samples.consumer_lag(self.stack.trainer_consumer)
            joiner_metrics = self.stack.metrics.get("joiner")
            drained["joiner"] = joiner_outcomes(joiner_metrics) if joiner_metrics else {}
            drained["joiner_quality"] = joiner_quality(joiner_metrics) if joiner_metrics else {}
        finally:
            samples.close()
            clients.close()
        return self._result(data, frozen_scores, batch, replayed, drained, lag)

    def _warn_about_the_stack(self, samples: SampleLog) -> None:
        """Says what in the stack will make the figures worse than they should be."""
        horizon = self.stack.join_window + self.stack.join_lateness
        if horizon > LONG_WINDOW:
            _say(f"note: the joiner's window + lateness is {horizon:g} s of event time: negatives reach the trainer "
                 f"that long after positives, which costs served AUC on this data (`monolith up --join-window "
                 f"10 --join-lateness 10`, as `--up` does)")  # fmt: skip
        stored = samples.events_stored()
        if stored:
            _say(f"note: EVENTS already holds {stored:,} messages: if an earlier replay ran on this stack, the "
                 "joiner's watermarks are past this replay's event times and its windows close at once "
                 "(every sample a negative); replay into a fresh stack (`monolith up --fresh`)")  # fmt: skip

    def _batch_stage(self, data: ReplayData) -> dict[str, Any]:
        """Trains one pass over the first part through the PS; freezes a copy; scores the replay with it."""
        _say(f"batch stage: {len(data.train):,} examples against {', '.join(self.stack.training_shards)} "
             f"and the dense-PS at {self.stack.dense_ps}")  # fmt: skip
        started = time.monotonic()
        with ShardedEmbeddingClient(list(self.stack.training_shards), self.config.table_dims(),
                                    occurrence_tables=self.config.occurrence_tables()) as sparse, \
                DensePSClient(self.stack.dense_ps) as dense:  # fmt: skip
            worker = TrainerWorker(self.config, sparse, dense)
            try:
                summary = train_pass(worker, data.train, 0, 1, self._stop)
            finally:
                worker.close()
            seconds = time.monotonic() - started
            copy = freeze(self.config, sparse, dense)
        _say(f"batch stage done in {seconds:.1f} s; frozen copy: {sum(copy.rows.values()):,} rows, "
             f"dense version {copy.dense_version}")  # fmt: skip
        if self.stack.controller is not None:
            self._checkpoint_batch_stage()
        return {
            "batch_examples": summary["examples"],
            "batch_seconds": seconds,
            "batch_examples_per_s": summary["examples_per_s"],
            "frozen_scores": copy.score(data.stream).astype(np.float64),
        }

    def _checkpoint_batch_stage(self) -> None:
        """Has the controller take a checkpoint of what the batch stage trained.

        The batch stage trains the parameter servers directly, not through the samples
        stream, so no replay of the stream can redo it: a rollback to a cut taken before it
        (the controller's first is taken as the stack comes up) would undo the whole batch
        stage. A cut right after it makes every later rollback keep it.
        """
        assert self.stack.controller is not None
        with ControllerClient(self.stack.controller, timeout=120.0) as controller:
            info = controller.checkpoint()
        _say(f"checkpoint {info.id} ({info.kind}, {info.rows:,} rows) of the batch stage taken")

    def _wait_for_serving(self, clients: StackClients, data: ReplayData, frozen_scores: np.ndarray) -> bool:
        """Waits until model-serving scores the first replayed events as the frozen copy does; whether it did.

        The serving shards follow the training shards and serving pulls dense parameters,
        each every sync interval; starting before they caught up would score the first
        events with a half-trained model. The Predicts carry no request_id: no impression.
        """
        indices = range(min(CATCH_UP_EVENTS, len(data)))
        features = data.features(indices)
        deadline = time.monotonic() + self.options.catch_up_timeout
        gap = math.inf
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                served = clients.predict(features, None, None)
                gap = float(np.max(np.abs(served - frozen_scores[: len(indices)])))
                if gap <= CATCH_UP_TOLERANCE:
                    _say("serving answers as the frozen copy does: replaying")
                    return True
            except Exception as exc:  # noqa: BLE001 - serving may still be syncing
                _LOGGER.debug("catch-up Predict failed: %s", exc)
            self._stop.wait(0.2)
        _say(f"serving still differs from the frozen copy by {gap:.2g} after {self.options.catch_up_timeout:.0f} s; "
             "replaying anyway")  # fmt: skip
        return False

    def _replay(self, clients: StackClients, data: ReplayData, samples: SampleLog) -> dict[str, Any]:
        """Replays every event at the pace; returns the served scores, timing and the probe."""
        book = ScoreBook(data.stream.labels)
        gate = WindowGate(self.stack.join_window + self.stack.join_lateness, stop=self._stop)
        watch = ImpressionWatch(self.stack.streams_config(), self.prefix)
        watch.start()
        expiry = PeriodicTask("replay-impression-expiry", 0.5, watch.expire)
        expiry.start()
        probe = FreshnessProbe(
            clients.predict, clients.report, gate, self.stack.partitions, watch.after_stored,
            user=data.user(0), movie=data.movie(0),
            first_user_id=PROBE_USER_BASE + (int(self.run_id, 16) << 16),
            request_prefix=f"{self.prefix}probe-",
            interval=self.options.probe_interval or 1.0, timeout=self.options.probe_timeout,
        )  # fmt: skip
        in_flight = threading.BoundedSemaphore(2 * self.options.workers)
        pacer = Pacer(self.options.speed, stop=self._stop)
        progress = PeriodicTask("replay-progress", 1.0, lambda: self._print_progress(book, pacer, probe, samples),
                                run_first=False)  # fmt: skip
        if self.options.progress:
            progress.start()
        if self.options.probe_interval > 0:
            probe.start()
        pool = futures.ThreadPoolExecutor(self.options.workers, thread_name_prefix="replay")
        try:
            for i in range(len(data)):
                if not pacer.wait_for(i):
                    break
                in_flight.acquire()
                event_time, partition = data.event_time(i), partition_of(f"{self.prefix}{i}", self.stack.partitions)
                if not gate.enter(event_time, partition):
                    in_flight.release()
                    break
                # The event leaves the gate once its impression is stored too (serving
                # publishes it after Predict returns), so no later event overtakes it.
                pool.submit(self._one_event, clients, data, book, i).add_done_callback(
                    lambda done, i=i, t=event_time, p=partition: (
                        in_flight.release(),
                        watch.after_stored(f"{self.prefix}{i}", lambda: gate.leave(t, p))
                        if done.result() else gate.leave(t, p),
                    )
                )
        finally:
            pool.shutdown(wait=True)
            seconds = time.monotonic() - pacer.start
            probe.stop()
            expiry.stop()
            watch.close()
            progress.stop()
            if self.options.progress:
                self._print_progress(book, pacer, probe, samples, final=True)
        return {"book": book, "seconds": seconds, "probe": probe, "gate_waits": gate.waits,
                "impressions_unseen": watch.unseen}  # fmt: skip

    def _one_event(self, clients: StackClients, data: ReplayData, book: ScoreBook, i: int) -> bool:
        """Event i: its Predict (the impression), then its action; whether Predict answered."""
        request_id, item_id, event_time = f"{self.prefix}{i}", data.item_id(i), data.event_time(i)
        try:
            scores = clients.predict(data.features([i]), request_id, event_time)
        except Exception as exc:  # noqa: BLE001 - counted; the replay goes on
            book.fail(i)
            with self._lock:
                self._predict_errors += 1
                self._done += 1
            _LOGGER.debug("Predict of event %d failed: %s", i, exc)
            return False
        book.record(i, float(scores[0]))
        positive = data.label(i) >= 0.5
        reported = False
        if positive or not self.options.implicit_negatives:
            try:
                clients.report(request_id, item_id, event_time, positive)
                reported = True
            except Exception as exc:  # noqa: BLE001 - without its action the impression becomes a negative
                with self._lock:
                    self._action_errors += 1
                _LOGGER.debug("report_action of event %d failed: %s", i, exc)
        label = 1.0 if positive and reported else 0.0
        with self._lock:
            self._impressions.append((request_id, item_id, label))
            self._actions += positive and reported
            self._negative_actions += not positive and reported
            self._done += 1
        return True

    def _drain(self, clients: StackClients, data: ReplayData, samples: SampleLog,
               probe: FreshnessProbe) -> dict[str, Any]:  # fmt: skip
        """Closes the joiner's windows, then waits until every expected sample is on SAMPLES."""
        last = float(data.stream.timestamps.max())
        close_at = closing_time(last, self.stack.join_window, self.stack.join_lateness)
        features = data.features([0])
        for request_id in watermark_request_ids(f"{self.prefix}wm-", self.stack.partitions):
            clients.predict(features, request_id, close_at)
        rate = self.config.training.negative_sample_rate
        with self._lock:
            sent = list(self._impressions)
        expected = expected_samples(sent + probe.impressions(), rate)
        _say(f"replay done; waiting for the joiner's {len(expected):,} samples (windows closed at event time "
             f"{close_at:.0f})")  # fmt: skip
        deadline = time.monotonic() + self.options.drain_timeout
        last_count, last_change = -1, time.monotonic()
        while True:
            count, _ = samples.counts()
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            counts = reconcile(expected, samples.samples())
            now = time.monotonic()
            if counts.lost == 0 and samples.caught_up():
                break
            if now > deadline or now - last_change > self.options.quiet_timeout or self._stop.is_set():
                _say(f"stopped waiting: {counts.lost:,} of {counts.expected:,} samples missing")
                break
            time.sleep(0.25)
        return {"expected": expected, "counts": reconcile(expected, samples.samples()),
                "mislabeled": mislabeled(expected, samples.samples())[:5]}  # fmt: skip

    # ---------------------------------------------------------------- figures

    def _print_progress(self, book: ScoreBook, pacer: Pacer, probe: FreshnessProbe, samples: SampleLog,
                        final: bool = False) -> None:  # fmt: skip
        with self._lock:
            done = self._done
        elapsed = max(time.monotonic() - pacer.start, 1e-9)
        freshness = probe.seconds()
        sample_count, _ = samples.counts()
        lag = samples.consumer_lag(self.stack.trainer_consumer)
        parts = [
            f"{done:,}/{len(book.labels):,} events",
            f"{done / elapsed:,.0f} events/s",
            f"served AUC {book.auc():.4f}",
            f"freshness p50 {percentile(freshness, 50):.2f} s ({len(freshness)} probes)",
            f"samples {sample_count:,}",
            f"trainer lag {'?' if lag is None else f'{lag:,}'}",
        ]
        line = "[replay] " + ", ".join(parts)
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def _result(self, data: ReplayData, frozen_scores: np.ndarray, batch: dict[str, Any],
                replayed: dict[str, Any], drained: dict[str, Any], lag: int | None) -> dict[str, Any]:  # fmt: skip
        book: ScoreBook = replayed["book"]
        probe: FreshnessProbe = replayed["probe"]
        labels, served = book.labels, book.scores
        scored = ~np.isnan(served)
        # Every AUC over the same events: the ones serving scored.
        frozen = np.where(scored, frozen_scores, np.nan)
        baseline = np.where(scored, running_mean_scores(data.data)[len(data.train) :], np.nan)
        freshness = probe.seconds()
        counts = drained["counts"]
        result: dict[str, Any] = {
            "served_progressive_auc": auc_of_scored(labels, served),
            "frozen_auc": auc_of_scored(labels, frozen),
            "running_mean_baseline_auc": auc_of_scored(labels, baseline),
            "served_differs_from_frozen": float(np.mean(np.abs(served[scored] - frozen[scored]) > CATCH_UP_TOLERANCE))
            if scored.any() else math.nan,  # fmt: skip
            "events": int(scored.sum() + book.failed),
            "events_per_s": (book.recorded + book.failed) / max(replayed["seconds"], 1e-9),
            "speed": self.options.speed,
            "freshness_p50_s": percentile(freshness, 50),
            "freshness_p99_s": percentile(freshness, 99),
            "freshness_probes": len(freshness),
            "freshness_misses": sum(r.missed for r in probe.results()),
            "impressions": len(self._impressions) + len(probe.impressions()),
            "probe_impressions": len(probe.impressions()),
            "actions": self._actions + probe.actions(),
            "negative_actions": self._negative_actions,
            "samples_expected": counts.expected,
            "samples_joined": counts.joined,
            "samples_lost": counts.lost,
            "samples_duplicated": counts.duplicated,
            "samples_unexpected": counts.unexpected,
            "samples_mislabeled": counts.mislabeled,
            "samples_mislabeled_examples": drained["mislabeled"],
            # None: the joiner's metrics were not readable; a count it never made is 0.
            **{f"joiner_{outcome}": drained["joiner"].get(outcome, 0) if drained["joiner"] else None
               for outcome in ("late_actions", "orphan_actions", "late_impressions")},  # fmt: skip
            # The served model's quality by the replay's own count, beside the joiner's metrics
            # (None: unreadable) over the samples it published, probes included.
            "served_positive_rate": float(np.mean(labels[scored])) if scored.any() else math.nan,
            "served_calibration_ratio": float(np.mean(served[scored]) / np.mean(labels[scored]))
            if scored.any() and np.mean(labels[scored]) > 0 else math.nan,  # fmt: skip
            **{f"joiner_{key}": drained["joiner_quality"].get(key) for key in
               ("served_auc", "calibration_ratio", "positive_rate", "quality_samples", "label_delay_mean_s")},  # fmt: skip
            "predict_errors": self._predict_errors,
            "action_errors": self._action_errors,
            "replay_seconds": replayed["seconds"],
            "window_gate_waits": replayed["gate_waits"],
            "impressions_unseen": replayed["impressions_unseen"],
            "consumer_lag": lag,
            **batch,
        }
        if self.options.plot:
            result["plot"] = report.plot_rolling_auc(
                self.options.plot, labels,
                {"served online": served, "frozen after the batch stage": frozen, "running-mean baseline": baseline},
                title=f"MovieLens-100k replay at {result['events_per_s']:.0f} events/s: rolling AUC",
            )  # fmt: skip
        return result
