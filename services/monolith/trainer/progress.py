"""A progress line for long jobs: examples/s, loss and a running AUC, on stderr."""

from __future__ import annotations

import sys
import time
from collections import deque

import numpy as np

from monolith.model.quality import auc


class Progress:
    """Prints at most once per `interval` seconds; a final line on `close()`.

    Args:
        label: what is running, e.g. "train".
        total: examples expected (0 if unknown).
        window: predictions kept for the running AUC.
        interval: seconds between lines.
        enabled: print at all (benchmarks printing JSON keep stderr quiet if asked).
    """

    def __init__(self, label: str, total: int = 0, window: int = 20_000, interval: float = 2.0,
                 enabled: bool = True) -> None:  # fmt: skip
        self.label = label
        self.total = total
        self.examples = 0
        self._interval = interval
        self._enabled = enabled
        self._start = time.perf_counter()
        self._last = self._start
        self._loss_sum = 0.0
        self._labels: deque[np.ndarray] = deque()
        self._scores: deque[np.ndarray] = deque()
        self._window = window
        self._kept = 0

    def update(self, n: int, loss: float | None = None, labels: np.ndarray | None = None,
               scores: np.ndarray | None = None) -> None:  # fmt: skip
        """Records n more examples, their mean loss and (optionally) their predictions."""
        self.examples += n
        if loss is not None:
            self._loss_sum += loss * n
        if labels is not None and scores is not None:
            self._labels.append(labels)
            self._scores.append(scores)
            self._kept += len(labels)
            while self._kept - len(self._labels[0]) >= self._window:
                self._kept -= len(self._labels.popleft())
                self._scores.popleft()
        now = time.perf_counter()
        if now - self._last >= self._interval:
            self._last = now
            self._print()

    @property
    def examples_per_s(self) -> float:
        return self.examples / max(time.perf_counter() - self._start, 1e-9)

    def running_auc(self) -> float:
        if not self._labels:
            return float("nan")
        return auc(np.concatenate(self._labels), np.concatenate(self._scores))

    def close(self) -> None:
        self._print()

    def _print(self) -> None:
        if not self._enabled:
            return
        parts = [f"[{self.label}] {self.examples}" + (f"/{self.total}" if self.total else "") + " examples",
                 f"{self.examples_per_s:,.0f} ex/s"]  # fmt: skip
        if self._loss_sum:
            parts.append(f"loss {self._loss_sum / max(self.examples, 1):.4f}")
        if self._labels:
            parts.append(f"running auc {self.running_auc():.4f}")
        print(", ".join(parts), file=sys.stderr, flush=True)
