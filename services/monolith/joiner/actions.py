"""Checking reported actions before they are stored on EVENTS (ids by the one id rule, monolith.streams.ids)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monolith.api.joiner.v1 import joiner_pb2 as pb
from monolith.common.errors import InvalidArgument, shorten
from monolith.joiner.config import JoinerConfig
from monolith.streams.ids import check_id


def check_actions(actions: Sequence[pb.Action], config: JoinerConfig, now: float) -> None:
    """Raises InvalidArgument naming the first bad action and what is wrong with it.

    Args:
        actions: the request's actions.
        config: the accepted kinds and the limits.
        now: this process's clock, only to refuse times absurdly far ahead of it.
    """
    if not actions:
        raise InvalidArgument("no actions: send at least one")
    if len(actions) > config.max_actions_per_request:
        raise InvalidArgument(
            f"{len(actions)} actions in one request; at most max_actions_per_request="
            f"{config.max_actions_per_request}"
        )
    for i, action in enumerate(actions):
        where = f"actions[{i}]"
        check_id(f"{where}.request_id", action.request_id)
        check_id(f"{where}.item_id", action.item_id)
        if action.kind not in config.action_kinds:
            raise InvalidArgument(
                f"{where}.kind: unknown action kind {shorten(repr(action.kind))}; accepted: "
                f"{', '.join(config.action_kinds)}"
            )
        if not (math.isfinite(action.label) and 0.0 <= action.label <= 1.0):
            raise InvalidArgument(f"{where}.label: must be in [0, 1], got {action.label}")
        check_event_time(f"{where}.event_time", action.event_time, now, config.max_time_ahead)


def check_event_time(what: str, value: float, now: float, max_ahead: float) -> None:
    """Seconds since the epoch: set, finite, not absurdly far ahead of `now`."""
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{what}: must be a finite number of seconds since the epoch > 0, got {value}")
    if value > now + max_ahead:
        raise InvalidArgument(
            f"{what}: {value:.0f} is more than {max_ahead:g} s ahead of this server's clock ({now:.0f})"
        )

