"""Waiting on a condition with a deadline: tests poll the state they expect, never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0  # seconds; generous for a loaded 2-core machine, never reached when things work


def wait_for(
    condition: Callable[[], T],
    what: str,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.05,
    step: Callable[[], None] | None = None,
) -> T:
    """Polls `condition` until it returns something truthy, and returns that.

    Args:
        condition: checked at once, then every `interval` seconds.
        what: what is awaited, for the failure message ("the joiner to publish 3 samples").
        timeout: seconds before giving up.
        interval: seconds between checks.
        step: called between checks (e.g. to drive a fake clock or pump a loop).

    Raises:
        AssertionError: the condition stayed falsy for `timeout` seconds; the message names
            `what` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        if step is not None:
            step()
        time.sleep(interval)
