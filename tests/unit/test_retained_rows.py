"""The ledger of rows a serving shard keeps although its training shard lacks them."""

from __future__ import annotations

import numpy as np

from monolith.embedding_ps.retained import RetainedRows


def ids(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def times(*values: int) -> np.ndarray:
    return np.array(values, np.uint32)


def test_retained_ids_leave_when_training_speaks_of_them_again() -> None:
    ledger = RetainedRows()
    ledger.retain("item", ids(5, 3, 9), times(10, 20, 30))
    ledger.retain("user", ids(1), times(10))
    assert len(ledger) == 4 and ledger.ids("item").tolist() == [3, 5, 9]

    ledger.forget("item", ids(5, 7))  # 7 was never retained
    ledger.forget("tag", ids(1))  # nothing retained there

    assert ledger.ids("item").tolist() == [3, 9] and len(ledger) == 3
    ledger.forget("user", ids(1))
    assert ledger.ids("user").tolist() == [] and len(ledger) == 2


def test_retaining_an_id_again_keeps_its_newer_time() -> None:
    ledger = RetainedRows()
    ledger.retain("item", ids(3, 4), times(10, 10))
    ledger.retain("item", ids(4), times(50))

    assert ledger.ids("item").tolist() == [3, 4]
    assert ledger.expired("item", clock=70.0, expire_after=30.0).tolist() == [3]


def test_expiry_follows_the_training_sweeps_cutoff() -> None:
    ledger = RetainedRows()
    ledger.retain("tag", ids(1, 2, 3), times(99, 100, 101))

    # The sweep evicts rows updated before floor(clock - expire_after) + 1: 100 and older here.
    assert ledger.expired("tag", clock=200.0, expire_after=100.0).tolist() == [1, 2]
    assert ledger.expired("tag", clock=0.0, expire_after=1.0).tolist() == []  # no clock yet: nothing expires
    assert ledger.expired("user", clock=200.0, expire_after=1.0).tolist() == []
    assert len(ledger) == 3  # `expired` only answers; the caller forgets what it deleted
