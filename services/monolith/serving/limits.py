"""How much work one Predict may cause, and when to stop working on it.

A request within gRPC's message limit can still be expensive: 64 MiB of short strings is
millions of values to decode, hash and look up. The limits here bound that work before
it starts, and the deadline stops work a client has already given up on.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated

import pydantic

from monolith.common.config import ConfigModel
from monolith.common.errors import DeadlineExceeded

Positive = Annotated[int, pydantic.Field(ge=1)]


class RequestLimits(ConfigModel):
    """Bounds on one Predict request; beyond them it is INVALID_ARGUMENT.

    The defaults keep the worst request within them to a fraction of a second and some
    tens of MiB on one core, and still take a ranking call of thousands of candidates.

    Attributes:
        max_batch: examples (the outer dimension) per request.
        max_elements: values summed over all input tensors, as declared by their shapes
            (a broadcast value counts once per element it fills).
        max_string_bytes: bytes of string values summed over all input tensors.
    """

    max_batch: Positive = 8192
    max_elements: Positive = 1 << 18
    max_string_bytes: Positive = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Deadline:
    """The moment (time.monotonic()) after which nobody waits for the answer.

    Attributes:
        at: monotonic time of the deadline; None means no deadline.
    """

    at: float | None = None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        """A deadline `seconds` from now; None (no client deadline) never passes."""
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float | None:
        """Seconds left (never below 0), or None without a deadline."""
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def check(self, stage: str) -> None:
        """Stops the request if the deadline has passed.

        Args:
            stage: what was about to run, for the message (e.g. "before the lookup").

        Raises:
            DeadlineExceeded: the deadline has passed.
        """
        if self.at is not None and time.monotonic() >= self.at:
            raise DeadlineExceeded(f"deadline passed {stage}; the request was abandoned")


NO_DEADLINE = Deadline()
