"""Retrying a call that found the server unavailable: exponential backoff with jitter.

Retries ride out a blip (a reset connection, a pod leaving a Service) within a few hundred
milliseconds, each failing fast; a server down for longer is the caller's UNAVAILABLE.

Only UNAVAILABLE is retried: the call did not reach a server that could answer (a restart, a
lost connection, a pod going away), so sending it again cannot do twice what was done once.
Predict is retried by default (it changes nothing); ReportActions only when the caller asks
(the joiner stores an action once by its id, so a repeat is harmless, but the caller decides).
"""

from __future__ import annotations

import dataclasses
import random

import grpc


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Attempts after the first, and the waits between them.

    Attributes:
        retries: attempts after the first (0: none).
        initial: seconds before the first retry.
        multiplier: each wait is this times the one before ...
        maximum: ... up to this many seconds.
    """

    retries: int = 2
    initial: float = 0.1
    multiplier: float = 3.0
    maximum: float = 1.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.initial < 0 or self.multiplier < 1 or self.maximum < 0:
            raise ValueError(f"retries and waits must not be negative, nor the multiplier below 1: {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (1, 2, ...): half the backoff, plus jitter up to
        the other half (a floor, so retries span a server's restart rather than bunching at 0)."""
        backoff = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        return backoff / 2 + random.uniform(0.0, backoff / 2)


NO_RETRIES = Backoff(retries=0)


def retryable(exc: grpc.RpcError) -> bool:
    """Whether a failed call may be sent again."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE
