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
        timeout_micros: how long a batch waits, from its oldest call's arrival, for more
            calls to fill it.
        threads: batch threads: while one looks rows up, another can run the tower.
    """

    max_examples: Annotated[int, pydantic.Field(ge=0)] = 2048
    timeout_micros: Annotated[int, pydantic.Field(ge=0)] = 1000
    threads: Annotated[int, pydantic.Field(ge=1, le=64)] = 2

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
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    scores: np.ndarray | None = None
    version: int = 0
    error: BaseException | None = None
    abandoned: str = ""  # why the caller stopped waiting: "deadline" or "cancelled"


class PredictBatcher:
    """Scores parsed calls in batches on `config.threads` batch threads.

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
        self._closing = False
        self._threads = [
            threading.Thread(target=self._run, name=f"predict-batch-{i}", daemon=True) for i in range(config.threads)
        ]

    def start(self) -> PredictBatcher:
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        """Stops the batch threads once the queue is empty (the server stopped taking calls)."""
        with self._lock:
            self._closing = True
            self._arrived.notify_all()
        for thread in self._threads:
            thread.join(timeout=10.0)

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
            if self._closing:
                raise MonolithError("the server is shutting down")
            self._queue.append(call)
            self._queued_examples += batch
            self._arrived.notify()
        if cancelled is None:
            finished = call.done.wait(deadline.remaining())
        else:
            finished = self._wait(call, cancelled)
        if not finished:
            reason = "cancelled" if cancelled is not None and cancelled.is_set() else "deadline"
            queued = self._abandon(call, reason)
            where = "while queued for batching" if queued else "while its batch was scored"
            if reason == "cancelled":
                raise Cancelled(f"the call was cancelled {where}")
            raise DeadlineExceeded(f"deadline passed {where}; the request was abandoned")
        if call.error is not None:
            raise call.error
        assert call.scores is not None
        return call.scores, call.version

    @staticmethod
    def _wait(call: _Call, cancelled: threading.Event) -> bool:
        """Waits for the scores until the deadline or a cancellation; whether they came."""
        while True:
            remaining = call.deadline.remaining()
            if call.done.wait(0.05 if remaining is None else min(0.05, remaining)):
                return True
            if cancelled.is_set() or remaining == 0.0:
                return call.done.is_set()

    def _abandon(self, call: _Call, reason: str) -> bool:
        """Marks a call its caller gave up on; whether it was still queued (and is now removed)."""
        BATCH_ABANDONED.labels(reason).inc()
        with self._lock:
            call.abandoned = reason
            try:
                self._queue.remove(call)
            except ValueError:
                return False
            self._queued_examples -= call.batch
            return True

    # ----------------------------------------------------------- batch threads

    def _run(self) -> None:
        while True:
            calls = self._take()
            if calls is None:
                return
            if calls:
                self._score(calls)

    def _take(self) -> list[_Call] | None:
        """The next batch: the oldest call and those queued behind it that fit; None when closing."""
        limit = self._config.max_examples
        with self._lock:
            while not self._queue:
                if self._closing:
                    return None
                self._arrived.wait()
            # Wait for more calls until the batch is full or the oldest call waited long enough.
            while self._queue and self._queued_examples < limit:
                remaining = self._queue[0].queued_at + self._timeout - time.monotonic()
                if remaining <= 0 or self._closing:
                    break
                self._arrived.wait(remaining)
            if not self._queue:  # another thread took them, or all were abandoned
                return []
            calls = [self._queue.popleft()]
            examples = calls[0].batch
            while self._queue and examples + self._queue[0].batch <= limit:
                examples += self._queue[0].batch
                calls.append(self._queue.popleft())
            self._queued_examples -= examples
            if self._queue:
                self._arrived.notify()  # more is queued: another batch thread may start on it
        return calls

    def _score(self, calls: list[_Call]) -> None:
        started = time.monotonic()
        for call in calls:
            BATCH_QUEUE_SECONDS.observe(started - call.queued_at)
        BATCH_CALLS.observe(len(calls))
        BATCH_EXAMPLES.observe(sum(c.batch for c in calls))
        ids, row_splits = _concatenate(calls)
        # The lookup may take as long as the latest caller waits; none waits longer.
        ats = [c.deadline.at for c in calls]
        deadline = NO_DEADLINE if None in ats else Deadline(max(ats))  # type: ignore[type-var]
        try:
            scores, version = self._model.score_versioned(ids, row_splits, sum(c.batch for c in calls), deadline)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            for call in calls:
                call.error = exc
                call.done.set()
            return
        start = 0
        for call in calls:
            call.scores, call.version = scores[start : start + call.batch], version
            start += call.batch
            call.done.set()


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
