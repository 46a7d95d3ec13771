"""The stack's supervisor on small real processes: start order, failures, restarts, stops.

The parts here are tiny HTTP servers (a Python one-file script), so every behaviour of
`monolith up` except the roles themselves is checked in about a second each.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.processes import Command, pid_alive
from helpers.waiting import wait_for
from monolith.common.process import free_port
from monolith.harness.stack.health import HttpOk
from monolith.harness.stack.parts import Part
from monolith.harness.stack.supervisor import Backoff, PartFailed, Supervisor

# A part: serves 200 on GET / once it is up. Flags: --port P, --after P (exit 3 unless that
# port answers at start), --delay S (start-up time), --fail (exit 2 at once, with a message),
# --ignore-term (SIGTERM does nothing), --never-listen.
SERVER = textwrap.dedent(
    """\
    import argparse, http.server, signal, socket, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int)
    p.add_argument("--after", type=int)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--fail", action="store_true")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--never-listen", action="store_true")
    args = p.parse_args()
    print("part starting", flush=True)
    if args.fail:
        sys.exit("part: bad --flag value")
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.after:
        try:
            socket.create_connection(("127.0.0.1", args.after), timeout=1).close()
        except OSError:
            sys.exit(f"part: started before port {args.after} was up")
    time.sleep(args.delay)
    if args.never_listen:
        while True:
            time.sleep(1)

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", args.port), Ok).serve_forever()
    """
)


@pytest.fixture
def make_part(tmp_path: Path) -> Callable[..., Part]:
    script = tmp_path / "part.py"
    script.write_text(SERVER)

    def make(name: str, *flags: str, after: tuple[Part, ...] = (), port: int = 0) -> Part:
        port = port or free_port()
        argv = [sys.executable, str(script), "--port", str(port), *flags]
        for dependency in after:
            argv += ["--after", dependency.address.rsplit(":", 1)[1]]
        return Part(name, tuple(argv), HttpOk(f"http://127.0.0.1:{port}/"), f"127.0.0.1:{port}",
                    after=tuple(p.name for p in after))  # fmt: skip

    return make


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Callable[..., tuple[Supervisor, io.StringIO]]]:
    """Builds supervisors that are stopped at the end of the test, whatever happens."""
    made: list[Supervisor] = []

    def build(parts: list[Part], **options: object) -> tuple[Supervisor, io.StringIO]:
        out = io.StringIO()
        supervisor = Supervisor(parts, str(tmp_path / "logs"), out=out, poll_interval=0.05, **options)
        made.append(supervisor)
        return supervisor, out

    yield build
    for supervisor in made:
        supervisor.stop()


def test_parts_start_after_what_they_wait_for_and_stop_last_first(make_part, supervise) -> None:
    first = make_part("first", "--delay", "0.5")  # a slow start: the second must wait for it
    second = make_part("second", after=(first,))
    supervisor, out = supervise([first, second])

    assert supervisor.start(threading.Event(), timeout=30)

    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["first", "second"]
    assert first.address in lines[0] and f"log {supervisor.log_path('first')}" in lines[0]
    pids = [supervisor.pid("first"), supervisor.pid("second")]
    supervisor.stop()
    stops = out.getvalue().splitlines()[2:]
    assert stops == ["second stopped (code 0)", "first stopped (code 0)"]
    assert not any(pid_alive(pid) for pid in pids)


def test_a_part_that_exits_at_start_fails_naming_it_with_its_log(make_part, supervise) -> None:
    good = make_part("good")
    bad = make_part("bad", "--fail")
    supervisor, _ = supervise([good, bad])

    with pytest.raises(PartFailed) as failed:
        supervisor.start(threading.Event(), timeout=30)

    assert failed.value.part == "bad"
    assert str(failed.value) == "bad did not come up: exited with code 1"
    assert failed.value.log_tail.splitlines() == ["part starting", "part: bad --flag value"]
    assert failed.value.log_path == supervisor.log_path("bad")


def test_a_part_not_ready_in_time_fails(make_part, supervise) -> None:
    silent = make_part("silent", "--never-listen")
    supervisor, _ = supervise([silent])

    with pytest.raises(PartFailed, match=r"silent did not come up: not ready 0.5 s after it started \(GET http"):
        supervisor.start(threading.Event(), timeout=0.5)


def test_a_stop_request_ends_the_start(make_part, supervise) -> None:
    supervisor, _ = supervise([make_part("silent", "--never-listen")])
    stop = threading.Event()
    stop.set()

    assert supervisor.start(stop, timeout=30) is False


def test_a_killed_part_is_restarted_on_its_port_with_its_log_appended(make_part, supervise) -> None:
    part = make_part("server")
    supervisor, out = supervise([part], backoff=lambda: Backoff(initial=0.1))
    assert supervisor.start(threading.Event(), timeout=30)
    old = supervisor.pid("server")
    assert old is not None

    os.kill(old, signal.SIGKILL)
    wait_for(lambda: supervisor.restarts("server") == 1 and supervisor.ready("server"), "the part restarted and ready",
             timeout=30, step=supervisor.check)

    assert supervisor.pid("server") not in (None, old)
    assert part.probe.ready()
    report = out.getvalue()
    assert "server exited with signal SIGKILL; restart 1 in 0.1 s" in report
    assert "server ready again after restart 1" in report
    log = Path(supervisor.log_path("server")).read_text()
    assert log.count("starting server:") == 2 and log.count("part starting") == 2


def test_a_part_that_ignores_sigterm_is_killed_after_the_timeout(make_part, supervise) -> None:
    supervisor, out = supervise([make_part("stubborn", "--ignore-term")], stop_timeout=0.5)
    assert supervisor.start(threading.Event(), timeout=30)
    pid = supervisor.pid("stubborn")

    supervisor.stop()

    assert "stubborn stopped (signal SIGKILL)" in out.getvalue()
    assert pid is not None and not pid_alive(pid)


DIES_WITH_PARENT = textwrap.dedent(
    """\
    import sys, threading
    from monolith.harness.stack.health import HttpOk
    from monolith.harness.stack.parts import Part
    from monolith.harness.stack.supervisor import Supervisor
    script, port, logs = sys.argv[1:]
    part = Part("orphan", (sys.executable, script, "--port", port), HttpOk(f"http://127.0.0.1:{port}/"))
    supervisor = Supervisor([part], logs, out=sys.stderr)  # stdout: only the pid
    supervisor.start(threading.Event(), timeout=30)
    print(supervisor.pid("orphan"), flush=True)
    threading.Event().wait()
    """
)


def test_parts_die_when_the_supervisor_is_killed(tmp_path) -> None:
    (tmp_path / "part.py").write_text(SERVER)
    parent = Command([sys.executable, "-c", DIES_WITH_PARENT, str(tmp_path / "part.py"), str(free_port()),
                      str(tmp_path / "logs")], tmp_path)  # fmt: skip
    try:
        child = int(parent.first_line(timeout=60))  # its supervisor gives the part 30 s to start
        assert pid_alive(child)
    finally:
        parent.kill()

    wait_for(lambda: not pid_alive(child), "the part to die with its supervisor", timeout=10)
