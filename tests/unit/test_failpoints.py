"""Failpoints: armed from the environment, a process dies by SIGKILL at the n-th hit; unarmed, nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from monolith.common import failpoints

SCRIPT = """
from monolith.common.failpoints import failpoint
for i in range(5):
    print(i, flush=True)
    failpoint("step")
print("done", flush=True)
"""


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_an_armed_failpoint_kills_the_process_at_its_nth_hit() -> None:
    done = run(failpoints.environment({"step": 3}))
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["0", "1", "2"]


def test_unarmed_or_other_failpoints_do_nothing() -> None:
    for env in ({}, failpoints.environment({"other.step": 1})):
        done = run(env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["0", "1", "2", "3", "4", "done"]


@pytest.mark.parametrize("spec", ["step", "step=0", "step=x", "=2"])
def test_a_malformed_spec_is_an_error(spec: str) -> None:
    done = run({failpoints.ENV: spec})
    assert done.returncode == 1
    assert "MONOLITH_FAILPOINTS" in done.stderr
