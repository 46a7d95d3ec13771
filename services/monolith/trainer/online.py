"""Online training: samples from the SAMPLES stream in micro-batches, acked after each step.

The trainer reads the stream through a durable JetStream consumer that every trainer
worker shares (the server hands each sample to one of them), decodes the samples into a
batch (`monolith.data.samples`: ids hashed as serving hashes them), trains one step with
`TrainerWorker` and acknowledges the samples only once the step's gradients are applied.
A trainer that dies mid-step acknowledges nothing, and the server redelivers its samples.

The load sets the batch: a step takes every sample the consumer holds for it, up to
`max_batch`, and waits only while there is none. A trickle trains one sample per step,
within milliseconds; a backlog trains in steps of up to `max_batch`, so the cost per sample
falls as the load rises and the trainer catches up. A step makes three round trips: the
fetch, the lookup (every shard at once) and the pushes (the sparse gradients to every
shard and the dense ones, which answer with the new dense parameters, at once); its
acknowledgements ride on the next write to NATS, flushed before a pause so that the
controller's cut sees them. After an idle spell the trainer pulls the dense parameters
before its next step, since another trainer (a batch stage) may have moved them meanwhile.

Failures are waited out, never fatal: while NATS or a parameter server is away the
trainer retries with capped exponential backoff, logging one line when an outage starts
and one when it ends, and keeps the samples of a step it is retrying marked in progress
so they are not handed to another worker meanwhile. A sample that cannot be trained on
(malformed, unknown feature, refused by the parameter servers) is terminated on the stream
and counted; it never stops the trainer. A step the PSs fail partway is retried whole, so
its gradients may be applied twice: training is at-least-once, the sample log
exactly-once, unless a checkpoint controller runs: it pauses the trainers between steps
(`StepGate`) to take consistent cuts, and after any failure rolls the parameter servers
and the consumer back to the last cut, so every sample after it is applied exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Annotated, Callable, Protocol, Sequence

import grpc
from pydantic import Field

from monolith.common.config import ConfigModel
from monolith.common.errors import FailedPrecondition, InvalidArgument, MonolithError, describe, from_rpc_error
from monolith.common.periodic import PeriodicTask
from monolith.data.batch import Batch
from monolith.data.samples import SampleDecoder
from monolith.streams.jetstream import TRANSIENT_ERRORS
from monolith.streams.pull_consumer import ConsumerState, Delivery
from monolith.trainer import metrics
from monolith.trainer.pause import StepGate
from monolith.trainer.worker import TrainerWorker

_LOGGER = logging.getLogger("monolith.trainer.online")

NATS_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, TimeoutError, MonolithError)
BAD_SAMPLE_LOG_LINES = 10  # bad samples logged one by one per BAD_SAMPLE_LOG_WINDOW; the rest are counted
BAD_SAMPLE_LOG_WINDOW = 10.0
DEFAULT_MAX_BATCH = 512
MAX_BATCH_LIMIT = 4096  # the consumer's max_ack_pending: no step can hold more


class SampleConsumer(Protocol):
    """What the trainer needs of the stream (`monolith.streams.pull_consumer.DurableConsumer`)."""

    @property
    def connected(self) -> bool: ...

    def open(self) -> None: ...

    def fetch(self, max_messages: int, timeout: float) -> list[Delivery]: ...

    def ack(self, deliveries: Sequence[Delivery]) -> None: ...

    def flush(self) -> None: ...

    def term(self, deliveries: Sequence[Delivery]) -> None: ...

    def nak(self, deliveries: Sequence[Delivery]) -> None: ...

    def in_progress(self, deliveries: Sequence[Delivery]) -> None: ...

    def state(self) -> ConsumerState: ...


class OnlineSettings(ConfigModel):
    """How the online trainer batches, waits and retries.

    Attributes:
        max_batch: samples per step at most; a step takes every sample delivered up to it.
        fetch_timeout: seconds one fetch waits for a first sample; the loop checks for a
            stop request at least this often.
        idle_after: seconds without a step after which the dense parameters are pulled
            before the next one.
        backoff_initial: the first retry's wait, in seconds; doubled per failure.
        backoff_max: the longest wait between retries.
        state_interval: seconds between reads of the consumer's state (lag metrics).
    """

    max_batch: Annotated[int, Field(ge=1, le=MAX_BATCH_LIMIT)] = DEFAULT_MAX_BATCH
    fetch_timeout: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 1.0
    idle_after: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    backoff_initial: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.1
    backoff_max: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 5.0
    state_interval: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0


class Backoff:
    """Retries of one dependency: capped exponential waits, one log line per outage.

    Args:
        what: the dependency, as log lines and the retries metric name it.
        settings: the waits.
        stop: set to give up waiting.
    """

    def __init__(self, what: str, settings: OnlineSettings, stop: threading.Event) -> None:
        self.what = what
        self._settings = settings
        self._stop = stop
        self._retries = metrics.RETRIES.labels(what)
        self._failures = 0
        self._started = 0.0
        self._cause = ""

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def failed(self, cause: str, wait: bool = True) -> bool:
        """Records a failure and waits before the retry; False if a stop came meanwhile."""
        if self._failures == 0:
            self._started = time.monotonic()
        kind = cause.split(":", 1)[0]
        if kind != self._cause:  # once per outage, or when its cause changes
            _LOGGER.warning("%s unavailable: %s; retrying with backoff (up to %g s)", self.what, cause,
                            self._settings.backoff_max)  # fmt: skip
            self._cause = kind
        self._failures += 1
        self._retries.inc()
        if not wait:
            return not self._stop.is_set()
        delay = min(self._settings.backoff_max, self._settings.backoff_initial * 2 ** (self._failures - 1))
        return not self._stop.wait(delay)

    def succeeded(self) -> None:
        if self._failures:
            _LOGGER.info("%s reachable again after %d failed attempt(s) over %.1f s", self.what, self._failures,
                         time.monotonic() - self._started)  # fmt: skip
        self._failures = 0
        self._cause = ""


@dataclasses.dataclass
class OnlineSummary:
    """What a run did, printed as JSON when it ends."""

    examples: int = 0
    steps: int = 0
    bad_samples: int = 0
    last_sequence: int = 0  # stream sequence of the newest sample of the last step acknowledged
    newest_event_time: int = 0
    dense_version: int = 0


class OnlineTrainer:
    """Trains from a sample consumer until `stop` is set.

    Args:
        consumer: the SAMPLES stream's durable consumer.
        make_worker: builds the trainer worker (it offers the dense-PS its initial
            parameters, so it is retried while the dense-PS is away).
        decoder: payloads to batches.
        settings: batching, waits, retries.
        stop: set (e.g. on SIGTERM) to stop after the step in progress.
        gate: holds the loop between steps while the checkpoint controller pauses it.
    """

    def __init__(self, consumer: SampleConsumer, make_worker: Callable[[], TrainerWorker], decoder: SampleDecoder,
                 settings: OnlineSettings, stop: threading.Event, gate: StepGate | None = None) -> None:  # fmt: skip
        self._consumer = consumer
        self.gate = gate or StepGate()
        self.ready = False
        self._make_worker = make_worker
        self._decoder = decoder
        self._settings = settings
        self._stop = stop
        self._nats = Backoff("nats", settings, stop)
        self._ps = Backoff("ps", settings, stop)
        self.summary = OnlineSummary()
        self._last_step = -float("inf")
        self._must_open = True
        self._resync_due = False  # a rollback happened while a step was parked
        self._bad_logged: list[float] = []
        self._rate_mark = (time.monotonic(), 0)

    # ------------------------------------------------------------------ the loop

    def run(self) -> OnlineSummary:
        """Trains until stopped; returns what it did."""
        metrics.READY.set(0)
        worker = self._start_worker()
        if worker is None:
            return self.summary
        state = PeriodicTask("consumer-state", self._settings.state_interval, self._refresh_state)
        state.start()
        try:
            while not self._stop.is_set():
                rolled_back = self.gate.enter(self._stop)
                if rolled_back is None:
                    break
                try:
                    if rolled_back or self._resync_due:
                        self._resync_due = False
                        worker = self._resync(worker)
                    deliveries = self._fetch()
                    if deliveries:
                        self._handle(worker, deliveries)
                finally:
                    if self.gate.pause_requested():
                        self._flush()  # the controller's cut reads the acknowledgement floor next
                    self.gate.leave()
        finally:
            self._flush()
            state.stop()
            self.ready = False
            metrics.READY.set(0)
            self.summary.dense_version = worker.dense_version
            worker.close()
        _LOGGER.info("stopped after %d examples in %d steps (last stream sequence %d)", self.summary.examples,
                     self.summary.steps, self.summary.last_sequence)  # fmt: skip
        return self.summary

    def _start_worker(self) -> TrainerWorker | None:
        """Opens the consumer and builds the worker, waiting out NATS and the PSs; None if stopped."""
        while not self._stop.is_set() and not self._open():
            pass
        worker = None
        while worker is None and not self._stop.is_set():
            try:
                worker = self._make_worker()
                self._ps.succeeded()
            except (MonolithError, grpc.RpcError) as exc:
                self._ps.failed(describe(_ps_error(exc)))
        if worker is not None:
            self.ready = True
            metrics.READY.set(1)
            _LOGGER.info("training online: steps of every sample delivered, up to %d; dense parameters at version %d",
                         self._settings.max_batch, worker.dense_version)  # fmt: skip
        return worker

    def _resync(self, worker: TrainerWorker) -> TrainerWorker:
        """After a rollback to a checkpoint: subscribe again, and pull the dense parameters in full.

        The restored dense-PS may be at a lower version than the one this worker holds,
        so a pull of "newer than mine" would keep the parameters of the abandoned future.
        A dense-PS rolled back to the empty state (no checkpoint yet) holds none: a new
        worker offers it initial parameters, as at start.

        Returns:
            The worker to train with.
        """
        self._must_open = True
        self.summary.last_sequence = 0
        metrics.SINCE_ROLLBACK.set(0)
        self._last_step = -float("inf")
        initialized = True
        while not self._stop.is_set():
            try:
                if not initialized:
                    fresh = self._make_worker()
                    worker.close()
                    worker, initialized = fresh, True
                worker.refresh_dense(force=True)
                self._ps.succeeded()
                break
            except (MonolithError, grpc.RpcError) as exc:
                error = _ps_error(exc)
                if isinstance(error, FailedPrecondition):
                    initialized = False  # no parameters there: offer initial ones, as at start
                    continue
                self._ps.failed(describe(error))
        _LOGGER.info("rolled back to a checkpoint: resuming from the consumer's position, dense version %d",
                     worker.dense_version)  # fmt: skip
        return worker

    def _open(self) -> bool:
        """(Re)opens the consumer; False after a failure (already waited out)."""
        try:
            self._consumer.open()
        except NATS_ERRORS as exc:
            self._nats.failed(describe(exc, "NATS"))
            return False
        self._must_open = False
        self._nats.succeeded()
        return True

    def _fetch(self) -> list[Delivery]:
        if self._must_open and not self._open():
            return []
        try:
            deliveries = self._consumer.fetch(self._settings.max_batch, self._settings.fetch_timeout)
        except NATS_ERRORS as exc:
            # The consumer may be gone (a server on an empty store): set it up again first.
            self._must_open = True
            self._nats.failed(describe(exc, "NATS"))
            return []
        if deliveries or self._consumer.connected:
            self._nats.succeeded()
        else:
            # While reconnecting a fetch just times out; it waited `fetch_timeout` already.
            self._nats.failed("DISCONNECTED: no connection to NATS", wait=False)
        return deliveries

    # ----------------------------------------------------------------- one batch

    def _handle(self, worker: TrainerWorker, deliveries: list[Delivery]) -> None:
        decoded = self._decoder.decode([d.data for d in deliveries])
        if decoded.rejected:
            self._reject([(deliveries[r.position], r.kind, r.reason) for r in decoded.rejected])
        good = [deliveries[i] for i in decoded.kept]
        if not good:
            return
        if time.monotonic() - self._last_step > self._settings.idle_after:
            # Another trainer may have moved the dense parameters while this one was idle.
            try:
                if not self._with_ps(worker.refresh_dense, good):
                    return
            except InvalidArgument as exc:
                _LOGGER.warning("could not pull the dense parameters: %s; training with the cached ones", exc)
        self._train(worker, decoded.batch, good)

    def _train(self, worker: TrainerWorker, batch: Batch, deliveries: list[Delivery]) -> None:
        """One step, retried while the PSs are away; samples the PSs refuse are rejected one by one."""
        started = time.monotonic()
        try:
            applied = self._with_ps(lambda: worker.train(batch), deliveries)
        except InvalidArgument as exc:
            if len(batch) == 1:
                self._reject([(deliveries[0], "refused", str(exc))])
            else:
                # Find the samples the PSs refuse (e.g. a time too far ahead of their clock).
                for i, delivery in enumerate(deliveries):
                    self._train(worker, batch.slice(i, i + 1), [delivery])
            return
        if not applied:
            return
        self._last_step = time.monotonic()
        metrics.STEP_SECONDS.observe(self._last_step - started)
        metrics.STEPS.inc()
        metrics.EXAMPLES.inc(len(batch))
        metrics.SINCE_ROLLBACK.inc(len(batch))
        self.summary.steps += 1
        self.summary.examples += len(batch)
        self.summary.newest_event_time = max(self.summary.newest_event_time, int(batch.timestamps.max()))
        metrics.NEWEST_EVENT_TIME.set(self.summary.newest_event_time)
        if self._reply(self._consumer.ack, deliveries, "acknowledge"):
            # The last step's newest, not the largest ever: a stream recreated empty starts over.
            self.summary.last_sequence = max(d.sequence for d in deliveries)
            metrics.LAST_SEQUENCE.set(self.summary.last_sequence)

    def _with_ps(self, call: Callable[[], object], deliveries: list[Delivery]) -> bool:
        """Runs PS calls, retrying transient failures; False if stopped first (samples handed back).

        Raises:
            InvalidArgument: the PSs refuse the request (not worth retrying).
        """
        while True:
            try:
                call()
            except (MonolithError, grpc.RpcError) as exc:
                error = _ps_error(exc)
                if isinstance(error, InvalidArgument):
                    self._ps.succeeded()
                    raise error from None
                if not self._ps.failed(describe(error)):
                    self._reply(self._consumer.nak, deliveries, "hand back")
                    return False
                if self.gate.pause_requested():
                    # The controller is restoring (or cutting): let it pause us mid-step.
                    rolled_back = self.gate.park(self._stop)
                    if rolled_back is None:
                        self._reply(self._consumer.nak, deliveries, "hand back")
                        return False
                    if rolled_back:
                        # The PSs are back at the cut and the consumer delivers from it: this
                        # step's samples come again; its partial gradients were rolled back.
                        self._resync_due = True
                        return False
                # Not redelivered to another worker while this one retries.
                self._reply(self._consumer.in_progress, deliveries, "mark in progress")
                continue
            self._ps.succeeded()
            return True

    def _reject(self, rejected: list[tuple[Delivery, str, str]]) -> None:
        now = time.monotonic()
        self._bad_logged = [t for t in self._bad_logged if now - t < BAD_SAMPLE_LOG_WINDOW]
        for delivery, kind, reason in rejected:
            metrics.BAD_SAMPLES.labels(kind).inc()
            if len(self._bad_logged) < BAD_SAMPLE_LOG_LINES:
                self._bad_logged.append(now)
                _LOGGER.warning("bad sample at stream sequence %d (%s): %s; dropped", delivery.sequence, kind, reason)
        self.summary.bad_samples += len(rejected)
        metrics.SINCE_ROLLBACK.inc(len(rejected))
        self._reply(self._consumer.term, [d for d, _, _ in rejected], "terminate")

    def _flush(self) -> None:
        """Waits for the server to hold every acknowledgement sent so far (a lost one is a redelivery)."""
        if self._consumer.connected:
            try:
                self._consumer.flush()
            except NATS_ERRORS as exc:
                self._nats.failed(describe(exc, "NATS (flush)"), wait=False)

    def _reply(self, reply: Callable[[Sequence[Delivery]], None], deliveries: Sequence[Delivery], what: str) -> bool:
        """Sends acks (or naks, terms, progress) once; a failure means a redelivery later, not a loss."""
        try:
            reply(deliveries)
        except NATS_ERRORS as exc:
            self._nats.failed(describe(exc, f"NATS ({what})"), wait=False)
            return False
        return True

    # -------------------------------------------------------------- lag metrics

    def _refresh_state(self) -> None:
        now = time.monotonic()
        mark, examples = self._rate_mark
        if now > mark:
            metrics.EXAMPLES_PER_SECOND.set((self.summary.examples - examples) / (now - mark))
        self._rate_mark = (now, self.summary.examples)
        try:
            state = self._consumer.state()
        except NATS_ERRORS:
            return  # the loop reports NATS outages; the gauges keep their last values
        metrics.CONSUMER_LAG.set(state.pending)
        metrics.CONSUMER_ACK_PENDING.set(state.ack_pending)
        metrics.CONSUMER_ACK_FLOOR.set(state.ack_floor)


def _ps_error(exc: MonolithError | grpc.RpcError) -> MonolithError:
    """A parameter server's failure as one of our errors, naming the server.

    The sharded embedding client names its shard in its own errors; a raw gRPC error is the
    dense-PS's. A deadline or a lost connection becomes UNAVAILABLE either way, so one
    outage is one kind of failure (logged once).
    """
    return from_rpc_error(exc, "dense-PS") if isinstance(exc, grpc.RpcError) else exc
