"""The sample-joiner's settings."""

from __future__ import annotations

import hashlib
from typing import Annotated

import pydantic
from pydantic import Field

from monolith.common.config import LIST_AS_TUPLE, ConfigModel

FiniteSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class JoinerConfig(ConfigModel):
    """How impressions and actions are joined.

    Attributes:
        window: event-time seconds an impression waits for a positive action; when the
            watermark passes `impression time + window` without one, it becomes a negative.
            An action that arrives before its impression waits as long for it.
        lateness: how far event time may run out of order: the watermark is the newest
            event time seen in the partition minus this.
        negative_sample_rate: the fraction of negatives kept (decided by a hash of the
            request_id and item, so a replay keeps the same ones); written on each sample.
        action_kinds: the action kinds ReportActions accepts.
        negative_kinds: the action kinds that are explicit negatives (a skip, a dislike, a
            low rating), whatever their label: one decides its key negative at once, with no
            window wait, and closes it. Each must be one of `action_kinds`.
        max_actions_per_request: actions one ReportActions call may carry.
        max_time_ahead: seconds an action's event time may be ahead of this process's
            clock (a sanity bound against garbage; it moves no clock).
        quality_window: the last samples published that the served model's quality
            (AUC, calibration, positive rate) is computed over, per process.
    """

    window: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 3600.0
    lateness: FiniteSeconds = 60.0
    negative_sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    action_kinds: Annotated[tuple[Annotated[str, Field(min_length=1, max_length=64)], ...], LIST_AS_TUPLE,
                            Field(min_length=1)] = ("click", "dislike")  # fmt: skip
    negative_kinds: Annotated[tuple[Annotated[str, Field(min_length=1, max_length=64)], ...],
                              LIST_AS_TUPLE] = ("dislike",)  # fmt: skip
    max_actions_per_request: Annotated[int, Field(ge=1)] = 10_000
    max_time_ahead: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 86_400.0
    quality_window: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000

    @pydantic.model_validator(mode="after")
    def _negatives_are_actions(self) -> JoinerConfig:
        unknown = [k for k in self.negative_kinds if k not in self.action_kinds]
        if unknown:
            raise ValueError(
                f"negative_kinds: {', '.join(unknown)} not among action_kinds ({', '.join(self.action_kinds)})"
            )
        return self


def keeps_negative(request_id: str, item_id: str, rate: float) -> bool:
    """Whether a negative is kept at `rate`: a stable hash of its key, not a random draw."""
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(f"{request_id}\x1f{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < rate * 2.0**64
