"""The stack's restart backoff, how exits are reported, and its checks of the part list."""

from __future__ import annotations

import pytest

from monolith.harness.stack.health import HttpOk
from monolith.harness.stack.parts import Part
from monolith.harness.stack.supervisor import Backoff, Supervisor, describe_exit


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    backoff = Backoff(initial=0.5, cap=4.0, reset_after=60.0)

    delays = [backoff.delay(ran_for=1.0) for _ in range(7)]

    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_backoff_starts_over_after_a_process_that_ran_long_enough() -> None:
    backoff = Backoff(initial=0.5, cap=30.0, reset_after=60.0)
    for _ in range(4):
        backoff.delay(ran_for=2.0)

    assert backoff.delay(ran_for=59.9) == 8.0  # still crash-looping
    assert backoff.delay(ran_for=60.0) == 0.5  # it was healthy for a minute
    assert backoff.delay(ran_for=0.1) == 1.0


def test_exit_codes_and_signals_are_described() -> None:
    assert describe_exit(0) == "code 0"
    assert describe_exit(2) == "code 2"
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(-15) == "signal SIGTERM"


def _part(name: str, *after: str) -> Part:
    return Part(name, ("true",), HttpOk("http://127.0.0.1:1/"), after=after)


def test_parts_must_have_unique_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="two parts are named 'a'"):
        Supervisor([_part("a"), _part("a")], str(tmp_path))


def test_a_part_must_come_after_what_it_waits_for(tmp_path) -> None:
    with pytest.raises(ValueError, match="b waits for a, which must come before it"):
        Supervisor([_part("b", "a"), _part("a")], str(tmp_path))
    with pytest.raises(ValueError, match="waits for missing"):
        Supervisor([_part("a"), _part("b", "missing")], str(tmp_path))
