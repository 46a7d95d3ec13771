"""StepGate.park: a step that cannot finish (a parameter server awaits a restore) lets the
controller's pause in, and learns on re-entry whether it was rolled back meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from monolith.trainer.pause import StepGate


def _in_step_then(gate: StepGate, stop: threading.Event, then: Callable[[], object]) -> tuple[threading.Thread, list]:
    """A loop thread that enters a step, waits for a pause request as a retrying step would, then runs `then`."""
    out: list = []
    entered = threading.Event()

    def loop() -> None:
        assert gate.enter(stop) is False
        entered.set()
        while not gate.pause_requested() and not stop.is_set():
            stop.wait(0.01)  # the step's retry backoff
        out.append(then())

    thread = threading.Thread(target=loop)
    thread.start()
    assert entered.wait(10)
    return thread, out


@pytest.mark.parametrize("rolled_back", [True, False])
def test_a_parked_step_lets_the_pause_in_and_learns_whether_it_was_rolled_back(rolled_back: bool) -> None:
    gate, stop = StepGate(), threading.Event()
    thread, out = _in_step_then(gate, stop, lambda: gate.park(stop))
    assert not gate.pause_requested()

    # Without park the pause would time out waiting for the step; parked, it gets in.
    assert gate.pause(lease=30, timeout=10)
    assert gate.state().paused
    gate.resume(rolled_back=rolled_back)
    thread.join(10)
    assert out == [rolled_back]
    assert gate.state().in_step  # re-entered: the step goes on (retried) or is dropped by the loop
    gate.leave()


def test_a_parked_step_returns_none_when_stopped() -> None:
    gate, stop = StepGate(), threading.Event()
    thread, out = _in_step_then(gate, stop, lambda: gate.park(stop))
    assert gate.pause(lease=30, timeout=10)
    stop.set()
    thread.join(10)
    assert out == [None]


def test_a_step_that_does_not_park_holds_the_pause_off() -> None:
    gate, stop = StepGate(), threading.Event()
    assert gate.enter(stop) is False
    assert not gate.pause(lease=30, timeout=0.05)  # the step is still in progress
    assert gate.pause_requested()  # the request stands until its lease ends or a resume
    gate.leave()
    assert gate.state().paused
