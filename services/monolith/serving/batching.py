"""Predict batching: concurrent calls scored together, as TensorFlow Serving's batching does.

Every Predict call pays fixed costs besides its candidates: a lookup RPC per embedding-PS
shard and one TensorFlow call for the dense tower. Under load many calls are in flight at
once, so `PredictBatcher` queues them after they are parsed (each call is checked and
hashed on its own thread, so a bad call fails alone, before it is queued) and a few batch
threads score what is queued together: one lookup per shard and one tower call for the
batch, the scores split back per call.

A batch thread takes the oldest queued call, then waits for more until the batch holds
`max_examples` examples or `timeout_micros` have passed since that call was queued, and
takes the queued calls that fit (a call larger than the bound runs alone). While the batch
threads are busy, calls queue up on their own, so under load batches fill without waiting;
the timeout only matters when the server is nearly idle.

Scores are exactly the unbatched ones: the batch is the calls' ragged ids concatenated,
scored by the same `ServingModel.score_versioned`, and every example's score depends on
its own ids alone.

Deadlines and cancellation stay per call. A call waits for its scores until its own
deadline: if that passes while it is queued it leaves the queue (DEADLINE_EXCEEDED) and
costs the batch nothing; if it passes while its batch runs, the call returns
DEADLINE_EXCEEDED at once and its scores are discarded. A cancelled call leaves the queue
the same way. A batch's lookup may take as long as the latest deadline among its calls, so
a short deadline never fails the others; a failure of the batch itself (a shard down)
fails the calls in it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Annotated, Mapping

import numpy as np
import pydantic

from monolith.common.config import ConfigModel
from monolith.common.errors import Cancelled, DeadlineExceeded, MonolithError
from monolith.serving.limits import NO_DEADLINE, Deadline
from monolith.serving.metrics import BATCH_ABANDONED, BATCH_CALLS, BATCH_EXAMPLES, BATCH_QUEUE_SECONDS
from monolith.serving.model import ServingModel


class BatchingConfig(ConfigModel):
    """How concurrent Predict calls are batched.

    Attributes:
        max_examples: examples per batch at most; 0 turns batching off (each call is
            scored on its own thread).
        timeout_micros: how long a batch that found the batcher idle waits, from its
            call's arrival, for more calls to fill it.
        threads: batches scored at a time. One by default: measured here (2 cores, 16
            callers), one slot made batches form while it was busy and scored 877 calls/s
            against 706 with two and 432 unbatched; two batches at a time mostly contend
            for the interpreter lock.
    """

    max_examples: Annotated[int, pydantic.Field(ge=0)] = 2048
    timeout_micros: Annotated[int, pydantic.Field(ge=0)] = 500
    threads: Annotated[int, pydantic.Field(ge=1, le=64)] = 1

    @property
    def enabled(self) -> bool:
        return self.max_examples > 0


@dataclasses.dataclass(eq=False)
class _Call:
    """One parsed Predict call waiting for its scores."""

    ids: Mapping[str, np.ndarray]
    row_splits: Mapping[str, np.ndarray]
    batch: int
    deadline: Deadline
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    wake: threading.Event = dataclasses.field(default_factory=threading.Event)  # scored, or a batch to lead
    scored: bool = False
    scores: np.ndarray | None = None
    version: int = 0
    error: BaseException | None = None
    lead: list[_Call] | None = None  # a batch handed to this call's thread to score


class PredictBatcher:
    """Scores parsed calls in batches, at most `config.threads` batches at a time.

    There are no batch threads: the callers' threads score the batches (flat combining).
    A call that finds a batch slot free and nobody queued leads a batch at once: it waits
    up to `timeout_micros` for more calls (none by default), then scores the calls queued
    from itself on, with no hand-off to another thread. A call that finds every slot busy
    queues; when a batch ends, its leader takes the next batch off the queue and hands it,
    with the slot, to that batch's oldest call, whose thread scores it.

    Args:
        model: the served model (parsing happens before, on the callers' threads).
        config: the bounds.
    """

    def __init__(self, model: ServingModel, config: BatchingConfig = BatchingConfig()) -> None:
        if not config.enabled:
            raise ValueError("PredictBatcher needs max_examples >= 1; batching off means no batcher")
        self._model = model
        self._config = config
        self._timeout = config.timeout_micros / 1e6
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: collections.deque[_Call] = collections.deque()
        self._queued_examples = 0
        self._free_slots = config.threads
        self._filling: _Call | None = None  # the head of the queue while its leader waits for more calls

    def score(
        self,
        ids: Mapping[str, np.ndarray],
        row_splits: Mapping[str, np.ndarray],
        batch: int,
        deadline: Deadline = NO_DEADLINE,
        cancelled: threading.Event | None = None,
    ) -> tuple[np.ndarray, int]:
        """The call's scores and the dense version that scored them, scored in some batch.

        Args:
            ids, row_splits, batch: the call as `ServingModel.parse` gave it.
            deadline: the call's deadline.
            cancelled: set when the client cancels the call (stops the wait).

        Raises:
            DeadlineExceeded: the deadline passed first.
            Cancelled: `cancelled` was set first.
            MonolithError: scoring the batch failed (e.g. the embedding-PS is unavailable).
        """
        call = _Call(ids, row_splits, batch, deadline)
        with self._lock:
            self._queue.append(call)
            self._queued_examples += batch
            if self._free_slots > 0 and len(self._queue) == 1:
                self._free_slots -= 1
                call.lead = self._take(wait=True)
            else:
                self._arrived.notify()  # a leader waiting for its batch to fill
        if call.lead is None:
            self._wait(call, cancelled)
        while call.lead is not None:  # this thread holds a slot: score, then pass it on
            calls, call.lead = call.lead, None
            try:
                self._score(calls)  # hands any error to the batch's callers
            finally:
                self._pass_slot()
        if call.error is not None:
            raise call.error
        if not call.scored:
            raise _gave_up(call.deadline, cancelled, queued=False)
        assert call.scores is not None
        return call.scores, call.version

    def _wait(self, call: _Call, cancelled: threading.Event | None) -> None:
        """Waits until the call is scored or handed a batch to lead.

        Raises:
            DeadlineExceeded, Cancelled: the caller gave up while the call was queued (it
                leaves the queue and costs the batches nothing).
        """
        while True:
            remaining = call.deadline.remaining()
            if cancelled is not None:
                remaining = 0.05 if remaining is None else min(0.05, remaining)
            call.wake.wait(remaining)
            with self._lock:
                if call.wake.is_set():
                    return
                if call.deadline.remaining() == 0.0 or (cancelled is not None and cancelled.is_set()):
                    error = _gave_up(call.deadline, cancelled, queued=call in self._queue)
                    if call in self._queue:
                        self._queue.remove(call)
                        self._queued_examples -= call.batch
                    else:  # taken into a batch being scored: stop waiting, its scores are discarded
                        call.error = error
                    raise error

    def _pass_slot(self) -> None:
        """After a batch: the next queued batch goes to its oldest call's thread, or the slot frees."""
        with self._lock:
            if not self._queue or self._queue[0] is self._filling:  # nothing queued, or a leader filling its batch
                self._free_slots += 1
                return
            calls = self._take(wait=False)
            calls[0].lead = calls
            calls[0].wake.set()

    def _take(self, wait: bool) -> list[_Call]:
        """Takes the calls queued from the head that fit in one batch (at least the head); holds the lock."""
        limit = self._config.max_examples
        if wait and self._timeout > 0:  # wait for more calls until the batch is full or the head waited enough
            self._filling = self._queue[0]  # no other leader takes it meanwhile (see _pass_slot)
            while self._queued_examples < limit:
                remaining = self._filling.queued_at + self._timeout - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.wait(remaining)
            self._filling = None
        calls = [self._queue.popleft()]
        examples = calls[0].batch
        while self._queue and examples + self._queue[0].batch <= limit:
            examples += self._queue[0].batch
            calls.append(self._queue.popleft())
        self._queued_examples -= examples
        return calls

    def _score(self, calls: list[_Call]) -> None:
        started = time.monotonic()
        for call in calls:
            BATCH_QUEUE_SECONDS.observe(started - call.queued_at)
        BATCH_CALLS.observe(len(calls))
        BATCH_EXAMPLES.observe(sum(c.batch for c in calls))
        # The lookup may take as long as the latest caller waits; none waits longer.
        ats = [c.deadline.at for c in calls]
        deadline = NO_DEADLINE if None in ats else Deadline(max(ats))  # type: ignore[type-var]
        try:
            ids, row_splits = _concatenate(calls)
            scores, version = self._model.score_versioned(ids, row_splits, sum(c.batch for c in calls), deadline)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            for call in calls:
                if call.error is None:
                    call.error = exc
                call.wake.set()
            return
        start = 0
        for call in calls:
            call.scores, call.version = scores[start : start + call.batch], version
            call.scored = True
            start += call.batch
            call.wake.set()


def _gave_up(deadline: Deadline, cancelled: threading.Event | None, queued: bool) -> MonolithError:
    """The error of a caller that stopped waiting, and the abandonment counted."""
    where = "while queued for batching" if queued else "while its batch was scored"
    if cancelled is not None and cancelled.is_set():
        BATCH_ABANDONED.labels("cancelled").inc()
        return Cancelled(f"the call was cancelled {where}")
    BATCH_ABANDONED.labels("deadline").inc()
    return DeadlineExceeded(f"deadline passed {where}; the request was abandoned")


def _concatenate(calls: list[_Call]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The calls' ragged ids as one batch: ids joined, row_splits joined and shifted."""
    if len(calls) == 1:
        return dict(calls[0].ids), dict(calls[0].row_splits)
    ids, row_splits = {}, {}
    for name in calls[0].ids:
        ids[name] = np.concatenate([c.ids[name] for c in calls])
        splits = [np.zeros(1, np.int64)]
        offset = 0
        for call in calls:
            split = call.row_splits[name]
            splits.append(split[1:] + offset)
            offset += int(split[-1])
        row_splits[name] = np.concatenate(splits)
    return ids, row_splits
