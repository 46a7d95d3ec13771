"""Starting role processes on this machine: free ports, health waits, clean stops.

Used by the local stack, benchmarks and tests, which run real servers as subprocesses.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monolith.common.channel import open_channel


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS may reuse it; callers bind soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_healthy(address: str, timeout: float = 60.0, service: str = "") -> None:
    """Blocks until the gRPC health check at `address` answers SERVING.

    Raises:
        TimeoutError: it did not within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    with open_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout:.0f} s")
            time.sleep(0.1)


def terminate(process: subprocess.Popen, timeout: float) -> int:
    """SIGTERM (if still running), then SIGKILL after `timeout` seconds; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class RoleProcess:
    """One `monolith <role>` subprocess (or another module's, e.g. the echo server).

    Args:
        args: arguments after `monolith`, e.g. ["embedding-ps", "--shard", "0", ...].
        log_path: file for its stdout and stderr (None: inherit).
        module: the module run with `python -m`.
        env: variables added to this process's environment (e.g. failpoints).
    """

    def __init__(
        self, args: Sequence[str], log_path: str | None = None, module: str = "monolith.cli",
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.args = list(args)
        self._log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        code = terminate(self.process, timeout)
        if self._log:
            self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL at once (failure tests)."""
        self.process.kill()
        self.process.wait()


def start_role(
    args: Sequence[str], log_path: str | None = None, env: dict[str, str] | None = None
) -> tuple[RoleProcess, str]:
    """Starts `monolith <role> ...` on a free loopback port (metrics on another free one).

    Returns:
        The process and its "127.0.0.1:port" address; wait for it with `wait_healthy`.
    """
    port = free_port()
    process = RoleProcess(
        ["--log-level", "WARNING", *args, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"],
        log_path,
        env=env,
    )
    return process, f"127.0.0.1:{port}"
