"""Driving a serving shard's `ServingSync` by hand in tests, one attempt at a time."""

from __future__ import annotations

from helpers.waiting import wait_for
from monolith.embedding_ps.sync import ServingSync, SyncResult


def sync_until(sync: ServingSync, ok: bool = True, timeout: float = 5.0) -> SyncResult:
    """Syncs until an attempt's `ok` is as wanted, and returns that attempt.

    A training shard restarted on the same port is not answered at once: the serving
    shard's channel may still be backing off from the outage.

    Raises:
        AssertionError: no attempt was within `timeout` seconds; the message quotes the last one.
    """
    last: list[SyncResult] = []

    def attempted() -> SyncResult | None:
        last[:] = [sync.sync_once()]
        return last[0] if last[0].ok == ok else None

    try:
        return wait_for(attempted, f"a sync attempt with ok={ok}", timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the last attempt: {last[0]}") from None
