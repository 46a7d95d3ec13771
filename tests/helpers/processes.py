"""Processes a test owns: started with their output captured, stopped one way.

Every stop goes through `monolith.common.process.terminate` (SIGTERM, then SIGKILL after a
timeout), the stop the stack and the harness use, so no test hand-writes its own. Output
goes to files, never to pipes nobody reads (a full pipe blocks the child), and failure
messages quote it.

- `Command`: any subprocess (a `monolith` command line, a script, nats-server, Prometheus).
- `Role`: `monolith <role>` through `monolith.common.process.RoleProcess`, its log in a file.
- `ParameterServers`: embedding-PS shards and a dense-PS as role processes on free ports.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from helpers.waiting import wait_for
from monolith.common.process import RoleProcess, free_port, terminate, wait_healthy

MONOLITH = str(Path(sys.executable).with_name("monolith"))  # the console script, as a user runs it
TAIL = 3000  # characters of output quoted in a failure message


@dataclasses.dataclass(frozen=True)
class Exited:
    """How a `Command` ended: its exit code (-N: signal N) and everything it wrote."""

    code: int
    stdout: str
    stderr: str


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _new_file(directory: str | Path, name: str, suffix: str) -> Path:
    """A new, empty file in `directory` whose name starts with `name` (unique, however many share it)."""
    fd, path = tempfile.mkstemp(suffix, f"{name}-", str(directory))
    os.close(fd)
    return Path(path)


class Command:
    """A subprocess a test owns, its stdout and stderr captured to files.

    Use it as a context manager, or call `stop`, `kill` or `wait`, so it never outlives the test.

    Args:
        argv: the command line.
        output_dir: where its stdout and stderr files go (a test's `tmp_path`).
        env: its environment (None: this process's).
        cwd: its working directory (None: this process's).
    """

    def __init__(self, argv: Sequence[str], output_dir: str | Path, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None) -> None:  # fmt: skip
        self.argv = [str(a) for a in argv]
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.stdout_path = _new_file(output_dir, Path(self.argv[0]).name, ".out")
        self.stderr_path = self.stdout_path.with_suffix(".err")
        # Append mode: the child writes at the end of the file whatever this process reads meanwhile.
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=err, env=None if env is None else dict(env),
                                            cwd=cwd)  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stdout(self) -> str:
        """What it wrote on stdout so far."""
        return _read(self.stdout_path)

    def stderr(self) -> str:
        """What it wrote on stderr so far."""
        return _read(self.stderr_path)

    def describe(self) -> str:
        """Its command line and the tail of its output, for a failure message."""
        return f"{' '.join(self.argv)}\nstdout: ...{self.stdout()[-TAIL:]}\nstderr: ...{self.stderr()[-TAIL:]}"

    def first_line(self, timeout: float) -> str:
        """Waits for the first whole line it writes on stdout, and returns it (without the newline).

        Raises:
            AssertionError: it wrote none within `timeout` seconds, or exited first.
        """

        def written() -> bool:
            done = "\n" in self.stdout()
            assert done or self.alive(), f"exited with {self.process.returncode} before a line: {self.describe()}"
            return done

        wait_for(written, f"a line on the stdout of {self.argv[0]}", timeout)
        return self.stdout().split("\n", 1)[0]

    def _exited(self) -> Exited:
        return Exited(self.process.returncode, self.stdout(), self.stderr())

    def wait(self, timeout: float) -> Exited:
        """Waits for it to exit by itself.

        Raises:
            AssertionError: it still ran after `timeout` seconds (it is then stopped); the message quotes its output.
        """
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            terminate(self.process, 5.0)
            raise AssertionError(f"still running after {timeout:g} s: {self.describe()}") from None
        return self._exited()

    def stop(self, timeout: float = 15.0) -> Exited:
        """SIGTERM (if it still runs), then SIGKILL after `timeout` seconds."""
        terminate(self.process, timeout)
        return self._exited()

    def kill(self) -> Exited:
        """SIGKILL at once (failure tests)."""
        self.process.kill()
        self.process.wait()
        return self._exited()

    def __enter__(self) -> Command:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(timeout=5.0)


def run(argv: Sequence[str], output_dir: str | Path, timeout: float, env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None) -> Exited:  # fmt: skip
    """Runs a command to its end (stopped, and the test failed, if it runs longer than `timeout` seconds)."""
    return Command(argv, output_dir, env, cwd).wait(timeout)


class Role:
    """`monolith <role> ...` as a process a test owns, stdout and stderr in `<logs>/<name>.log`.

    Args:
        logs: the directory of its log.
        name: the log's name, e.g. "embedding-ps-0".
        args: the arguments after `monolith`, e.g. ["dense-ps", "--port", "5001", ...].
    """

    def __init__(self, logs: str | Path, name: str, args: Sequence[str]) -> None:
        self.name = name
        self.log_path = Path(logs) / f"{name}.log"
        self.role = RoleProcess(list(args), log_path=str(self.log_path))

    @property
    def process(self) -> subprocess.Popen:
        return self.role.process

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        """Everything it logged so far."""
        return _read(self.log_path)

    def describe(self) -> str:
        """Its name and the tail of its log, for a failure message."""
        return f"{self.name} ({self.log_path}): ...{self.log()[-TAIL:]}"

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (if it still runs), then SIGKILL after `timeout` seconds; the exit code."""
        return self.role.stop(timeout)

    def kill(self) -> int:
        """SIGKILL at once (failure tests); the exit code (-9)."""
        self.role.kill()
        return self.role.stop()  # closes its log


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, we looked
        return False


@dataclasses.dataclass
class ParameterServers:
    """`monolith embedding-ps` shards and a `monolith dense-ps` as processes on free ports.

    `start` launches them (a test may start more while they import), `wait_healthy` waits
    until each is SERVING, `stop` stops every one.
    """

    shards: list[str]
    dense: str
    roles: list[Role]

    @classmethod
    def start(cls, logs: str | Path, config_path: str, num_shards: int = 2) -> ParameterServers:
        """Launches them, logging to `embedding-ps-<i>.log` and `dense-ps.log` in `logs`."""
        shards = [f"127.0.0.1:{free_port()}" for _ in range(num_shards)]
        dense = f"127.0.0.1:{free_port()}"
        common = ["--config", config_path, "--host", "127.0.0.1", "--metrics-port", "0"]
        roles = [
            Role(logs, f"embedding-ps-{i}", ["embedding-ps", "--shard", str(i), "--num-shards", str(num_shards),
                                             "--port", address.rsplit(":", 1)[1], *common])
            for i, address in enumerate(shards)
        ]  # fmt: skip
        roles.append(Role(logs, "dense-ps", ["dense-ps", "--port", dense.rsplit(":", 1)[1], *common]))
        return cls(shards, dense, roles)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Waits until every one is SERVING.

        Raises:
            AssertionError: one was not within `timeout` seconds; the message quotes its log.
        """
        for address, role in zip((*self.shards, self.dense), self.roles):
            try:
                wait_healthy(address, timeout)
            except TimeoutError as exc:
                raise AssertionError(f"{exc}: {role.describe()}") from None

    def stop(self, timeout: float = 15.0) -> list[int]:
        """Stops every part; their exit codes (0: a clean stop)."""
        return [role.stop(timeout) for role in self.roles]
