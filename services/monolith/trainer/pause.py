"""Pausing the online trainer between steps, for the checkpoint controller's cut. No gRPC here.

A checkpoint must hold the parameter servers exactly as some set of samples left them.
The trainer acknowledges a step's samples only after its gradients are applied, so
between two steps every sample delivered to it is both applied and acknowledged (or
neither): pausing every trainer there, the consumer's acknowledgement floor is the cut.
The gate holds the loop there; a pause is a lease, so a controller that dies mid-cut
does not stop training for good.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time


@dataclasses.dataclass(frozen=True)
class GateState:
    """Whether the loop is held, and whether it must resync after a rollback."""

    paused: bool
    in_step: bool


class StepGate:
    """Holds the training loop between steps while paused.

    The loop calls `enter` before each step (it blocks while paused) and `leave` after
    it; `pause` waits until the loop is out of a step.

    Args:
        start_paused: hold the loop from the start until `resume` (no lease): a trainer
            restarted under a controller waits for it to roll everything back first.
    """

    def __init__(self, start_paused: bool = False) -> None:
        self._cond = threading.Condition()
        self._paused_until = math.inf if start_paused else 0.0
        self._in_step = False
        self._rolled_back = False
        self.pauses = 0

    def pause(self, lease: float, timeout: float) -> bool:
        """Holds the loop before its next step for at most `lease` seconds from now.

        Returns:
            True once the loop is between steps (held there); False if the step in
            progress did not finish within `timeout` (the pause request stands until its
            lease ends or `resume`).
        """
        if not (lease > 0 and math.isfinite(lease)):
            raise ValueError(f"lease must be a positive number of seconds, got {lease}")
        deadline = time.monotonic() + timeout
        with self._cond:
            now = time.monotonic()
            self._paused_until = max(self._paused_until if self._held() else 0.0, now + lease)
            self.pauses += 1
            self._cond.notify_all()
            while self._in_step:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def resume(self, rolled_back: bool = False) -> None:
        """Lets the loop go on; `rolled_back` makes it resync (consumer, dense parameters) first."""
        with self._cond:
            self._paused_until = 0.0
            self._rolled_back = self._rolled_back or rolled_back
            self._cond.notify_all()

    def pause_requested(self) -> bool:
        """Whether a pause is asked for now (a step that cannot finish should park: `park`)."""
        with self._cond:
            return self._held()

    def park(self, stop: threading.Event) -> bool | None:
        """Lets a pause in while the loop is inside a step that cannot finish, then re-enters it.

        A step retrying against a parameter server that awaits a restore would otherwise
        hold off the very pause the restore needs. Its samples stay unacknowledged, so
        no cut is taken meanwhile (the controller waits for nothing to be unacknowledged).

        Returns:
            As `enter`: None if stopped, True if rolled back meanwhile (drop the step: its
            samples are delivered again from the restored position), else False (retry it).
        """
        self.leave()
        return self.enter(stop)

    def state(self) -> GateState:
        with self._cond:
            return GateState(paused=self._held() and not self._in_step, in_step=self._in_step)

    def enter(self, stop: threading.Event) -> bool | None:
        """Called by the loop before a step: waits while paused.

        Returns:
            None if `stop` was set while waiting; else whether a rollback happened while
            paused (the loop must resync before its step).
        """
        with self._cond:
            while self._held() and not stop.is_set():
                self._cond.wait(min(0.1, max(0.001, self._paused_until - time.monotonic())))
            if stop.is_set():
                return None
            self._in_step = True
            rolled_back, self._rolled_back = self._rolled_back, False
            return rolled_back

    def leave(self) -> None:
        """Called by the loop after a step (its samples acknowledged)."""
        with self._cond:
            self._in_step = False
            self._cond.notify_all()

    def _held(self) -> bool:
        return time.monotonic() < self._paused_until
