"""The shared test helpers (tests/helpers) do what the tests rely on: waits fail naming what they waited
for, metrics read through the services' parser, and every process a test owns is stopped one way."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest

from helpers.metrics import EMPTY, metrics_url, poll_metrics, read_metrics, registry, registry_value
from helpers.processes import Command, pid_alive, run
from helpers.waiting import wait_for
from monolith.common.process import free_port

# --------------------------------------------------------------------------- waiting


def test_wait_for_returns_the_condition_s_value_and_steps_between_checks() -> None:
    seen: list[int] = []

    done = wait_for(lambda: len(seen) >= 3 and "done", "three steps", timeout=10, interval=0,
                    step=lambda: seen.append(1))  # fmt: skip

    assert done == "done"
    assert len(seen) == 3


def test_wait_for_names_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0.1 s waiting for the answer \(last: 0\)"):
        wait_for(lambda: 0, "the answer", timeout=0.1)


# --------------------------------------------------------------------------- metrics

EVENTS = prometheus_client.Counter("test_helpers_events", "Events, by kind (tests/unit/test_helpers.py)", ["kind"])


@pytest.fixture
def page() -> Iterator[str]:
    """This process's default registry served on a free port; its /metrics URL."""
    server, thread = prometheus_client.start_wsgi_server(0, addr="127.0.0.1")
    yield metrics_url(server.server_port)
    server.shutdown()
    thread.join(10)


def test_metrics_are_read_through_the_services_parser(page: str) -> None:
    EVENTS.labels(kind="a").inc(2)
    EVENTS.labels(kind="b").inc(3)

    scraped = read_metrics(page)
    assert scraped.sum("test_helpers_events", kind="a") == registry().sum("test_helpers_events", kind="a") >= 2
    assert scraped.sum("test_helpers_events") == registry().sum("test_helpers_events") >= 5
    assert registry_value("test_helpers_events_total", kind="b") == scraped.sum("test_helpers_events", kind="b")
    assert registry_value("test_helpers_events_total", kind="none") == 0.0
    assert poll_metrics(page).has("test_helpers_events", kind="b")


def test_a_page_that_does_not_answer_is_empty_while_polled_and_a_failure_when_read() -> None:
    url = metrics_url(free_port())

    assert poll_metrics(url) is EMPTY and EMPTY.sum("anything") == 0
    with pytest.raises(AssertionError, match=f"no metrics at {url}"):
        read_metrics(url)


# --------------------------------------------------------------------------- processes


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_command_s_stdout_and_stderr_are_kept_apart(tmp_path: Path) -> None:
    done = run(python("import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"), tmp_path, timeout=30)

    assert (done.code, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_a_stop_is_sigterm_then_sigkill_after_the_timeout(tmp_path: Path) -> None:
    ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
    stubborn = Command(python(ignores_term + "time.sleep(60)"), tmp_path)
    polite = Command(python("import time; print('up', flush=True); time.sleep(60)"), tmp_path)
    for command in (stubborn, polite):
        assert command.first_line(timeout=30) == "up"  # its signal handler is in place

    assert stubborn.stop(timeout=0.2).code == -9
    assert polite.stop(timeout=30).code == -15  # Python's default SIGTERM action: exit by the signal
    assert not stubborn.alive() and not polite.alive()


def test_a_command_that_outlives_its_wait_is_stopped_and_named(tmp_path: Path) -> None:
    command = Command(python("import time; print('still here', flush=True); time.sleep(60)"), tmp_path)
    command.first_line(timeout=30)

    with pytest.raises(AssertionError, match=r"still running after 0.5 s: .*time.sleep.*\nstdout: ...still here"):
        command.wait(timeout=0.5)
    assert not command.alive()


def test_a_command_that_exits_before_its_first_line_fails_at_once(tmp_path: Path) -> None:
    command = Command(python("import sys; sys.exit('no line for you')"), tmp_path)

    with pytest.raises(AssertionError, match="exited with 1 before a line:.*no line for you"):
        command.first_line(timeout=30)


def test_a_context_manager_stops_its_command(tmp_path: Path) -> None:
    with Command(python("import time; time.sleep(60)"), tmp_path) as command:
        assert command.alive()
    assert not command.alive()


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen(python("pass"))
    wait_for(lambda: not pid_alive(child.pid), "the child to exit (unreaped: a zombie)", timeout=30)
    assert child.poll() == 0  # reaped only now
    assert not pid_alive(child.pid)
