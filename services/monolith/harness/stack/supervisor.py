"""Runs the stack's parts: start in dependency order, restart what dies, stop in reverse.

Everything happens on the calling thread (the main thread of `monolith up`): a loop polls
the children and their readiness probes. The children are spawned from that thread
because the kernel's parent-death signal, which stops them should `up` itself be killed,
is tied to the thread that forked them (it fires when that thread exits).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

from monolith.harness.stack.parts import Part
from monolith.common.process import terminate

TAIL_LINES = 20

# Each part is exec'd through this launcher, which first asks the kernel to SIGTERM it when
# `up` dies (prctl PR_SET_PDEATHSIG, kept across exec), even by SIGKILL, so no part outlives
# the stack. (A preexec_fn would do it in the forked child, which is unsafe while gRPC's
# threads run in `up`.) Linux only; elsewhere parts are started directly.
_LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _launch_argv(argv: Sequence[str]) -> list[str]:
    """`argv`, wrapped so that the process dies with this one (on Linux)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]


class StopRequest(Protocol):
    """What tells the supervisor to stop waiting (a `threading.Event` will do)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds; returns `is_set()`."""
        ...


class PartFailed(RuntimeError):
    """A part did not come up: it exited, or was not ready in time.

    Attributes:
        part: its name.
        reason: what happened.
        log_path: its log file.
        log_tail: the last lines it wrote in this attempt.
    """

    def __init__(self, part: str, reason: str, log_path: str, log_tail: str) -> None:
        super().__init__(f"{part} did not come up: {reason}")
        self.part = part
        self.reason = reason
        self.log_path = log_path
        self.log_tail = log_tail


@dataclasses.dataclass
class Backoff:
    """Capped exponential delays between restarts of a process that keeps dying.

    The first restart waits `initial` seconds, each next one twice as long, up to `cap`.
    A process that ran at least `reset_after` seconds before it died was healthy: its
    next restart waits `initial` again.
    """

    initial: float = 0.5
    cap: float = 30.0
    reset_after: float = 60.0
    failures: int = 0

    def delay(self, ran_for: float) -> float:
        """The wait before restarting a process that exited after running `ran_for` seconds."""
        if ran_for >= self.reset_after:
            self.failures = 0
        self.failures += 1
        return min(self.cap, self.initial * 2 ** (self.failures - 1))


def describe_exit(returncode: int) -> str:
    """The exit as words: "code 3", or "signal SIGKILL" for a negative Popen return code."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


class _Child:
    """One part's process across its restarts, and its log file."""

    def __init__(self, part: Part, log_path: str, backoff: Backoff) -> None:
        self.part = part
        self.log_path = log_path
        self.backoff = backoff
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.log_offset = 0
        self.ready = False
        self.restarts = 0
        self.restart_at: float | None = None

    def spawn(self, now: float) -> None:
        """Starts the process; its output is appended to the log after a header line."""
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- monolith up: {stamp} starting {self.part.name}: {' '.join(self.part.argv)}\n".encode())
            log.flush()
            self.log_offset = log.tell()
            # The child gets its own copy of the descriptor; ours closes with the block.
            self.process = subprocess.Popen(
                _launch_argv(self.part.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                # Its own process group: a Ctrl-C at the terminal reaches `up` only, which
                # then stops the parts in order instead of all at once.
                process_group=0,
            )
        self.started_at = now
        self.ready = False
        self.restart_at = None

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last `lines` lines the current (or last) attempt wrote."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code (None if it was not running)."""
        process, self.process = self.process, None
        self.ready = False
        self.restart_at = None
        if process is None:
            return None
        return terminate(process, timeout)


class Supervisor:
    """Starts, watches and stops a list of parts.

    Args:
        parts: the parts, each after those in its `after` (a valid start order).
        logs_dir: where `<part>.log` files go.
        out: where progress lines go (one per part ready, per exit, per restart, per stop).
        poll_interval: seconds between rounds of checks.
        stop_timeout: seconds a part has to exit after SIGTERM before SIGKILL.
        backoff: makes each part's restart backoff.
        clock: monotonic seconds (tests may pass their own).

    Raises:
        ValueError: two parts share a name, or one waits for a part not before it.
    """

    def __init__(
        self,
        parts: Sequence[Part],
        logs_dir: str,
        out: TextIO = sys.stdout,
        poll_interval: float = 0.2,
        stop_timeout: float = 15.0,
        backoff: Callable[[], Backoff] = Backoff,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        seen: set[str] = set()
        for part in parts:
            if part.name in seen:
                raise ValueError(f"two parts are named {part.name!r}")
            missing = [name for name in part.after if name not in seen]
            if missing:
                raise ValueError(f"{part.name} waits for {', '.join(missing)}, which must come before it")
            seen.add(part.name)
        os.makedirs(logs_dir, exist_ok=True)
        self._children = [_Child(p, os.path.join(logs_dir, f"{p.name}.log"), backoff()) for p in parts]
        self._by_name = {c.part.name: c for c in self._children}
        self._out = out
        self._poll_interval = poll_interval
        self._stop_timeout = stop_timeout
        self._clock = clock
        self._width = max((len(p.name) for p in parts), default=0)

    def log_path(self, name: str) -> str:
        return self._by_name[name].log_path

    def pid(self, name: str) -> int | None:
        """The running process of a part (None while it is down)."""
        process = self._by_name[name].process
        return process.pid if process is not None and process.poll() is None else None

    def restarts(self, name: str) -> int:
        return self._by_name[name].restarts

    def ready(self, name: str) -> bool:
        return self._by_name[name].ready

    def start(self, stop: StopRequest, timeout: float) -> bool:
        """Starts every part once the parts it waits for are ready; returns when all are.

        Parts whose dependencies are ready start together, so their start-up (mostly
        imports) overlaps.

        Args:
            stop: set by a signal handler: stop waiting.
            timeout: seconds each part has, from its start, to become ready.

        Returns:
            True once every part is ready; False if `stop` was set first.

        Raises:
            PartFailed: a part exited or was not ready in time. What started keeps running:
                call `stop()`.
        """
        while not stop.is_set():
            now = self._clock()
            for child in self._children:
                if child.process is None and all(self._by_name[d].ready for d in child.part.after):
                    child.spawn(now)
            for child in self._children:
                if child.process is None or child.ready:
                    continue
                returncode = child.process.poll()
                if returncode is not None:
                    raise PartFailed(
                        child.part.name, f"exited with {describe_exit(returncode)}", child.log_path, child.tail()
                    )
                if child.part.probe.ready():
                    child.ready = True
                    self._say(f"{self._where(child)}  (ready in {self._clock() - child.started_at:.1f} s)")
                elif now - child.started_at > timeout:
                    reason = f"not ready {timeout:g} s after it started ({child.part.probe})"
                    raise PartFailed(child.part.name, reason, child.log_path, child.tail())
            if all(c.ready for c in self._children):
                return True
            stop.wait(self._poll_interval)
        return False

    def supervise(self, stop: StopRequest) -> None:
        """Restarts parts that exit, until `stop` is set."""
        while not stop.wait(self._poll_interval):
            self.check()

    def check(self) -> None:
        """One round: notice exits, restart parts whose backoff is over, probe restarted ones."""
        now = self._clock()
        for child in self._children:
            name = child.part.name
            if child.process is not None:
                returncode = child.process.poll()
                if returncode is not None:
                    delay = child.backoff.delay(now - child.started_at)
                    child.process = None
                    child.ready = False
                    child.restarts += 1
                    child.restart_at = now + delay
                    self._say(
                        f"{name} exited with {describe_exit(returncode)}; restart {child.restarts} in {delay:g} s "
                        f"(log {child.log_path})"
                    )
                elif not child.ready and child.part.probe.ready():
                    child.ready = True
                    self._say(f"{name} ready again after restart {child.restarts}")
            elif child.restart_at is not None and now >= child.restart_at:
                child.spawn(now)

    def stop(self) -> None:
        """Stops every running part, last started first: SIGTERM, then SIGKILL after the timeout."""
        for child in reversed(self._children):
            running = child.process is not None and child.process.poll() is None
            returncode = child.stop(self._stop_timeout)
            if running and returncode is not None:
                self._say(f"{child.part.name} stopped ({describe_exit(returncode)})")

    def _where(self, child: _Child) -> str:
        part = child.part
        fields = [f"{part.name:<{self._width}}"]
        if part.address:
            fields.append(part.address if "://" in part.address else f"gRPC {part.address}")
        if part.metrics:
            fields.append(f"metrics {part.metrics}")
        fields.append(f"log {child.log_path}")
        return "  ".join(fields)

    def _say(self, line: str) -> None:
        print(line, file=self._out, flush=True)
