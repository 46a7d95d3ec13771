"""The `monolith` command's failures a user meets first: one clear line on stderr, exit 1.

A busy gRPC or /metrics port used to end in a 23-33-line traceback through gRPC or
http.server, and a trainer pointed at a dead parameter server in a 27-line one.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.processes import MONOLITH
from monolith.common.server import MonolithServer, ServerConfig
from monolith.dense_ps.service import build_dense_ps
from monolith.dense_ps.store import DenseStore
from monolith.model.config import default_config_path, load_model_config

TABLES = "features:\n  - name: user\n    dim: 8\n"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another socket is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, timeout: float = 120) -> tuple[int, str]:
    proc = subprocess.run([MONOLITH, *args], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


def _assert_one_line(role: str, returncode: int, stderr: str, *fragments: str, code: int = 1) -> None:
    lines = stderr.strip().splitlines()
    assert returncode == code, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"monolith {role}: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


def _role_args(role: str, tmp_path: Path) -> list[str]:
    if role == "embedding-ps":
        config = tmp_path / "model.yaml"
        config.write_text(TABLES)
        return ["--shard", "0", "--num-shards", "1", "--config", str(config)]
    if role == "serving":
        return ["--embedding-ps", "127.0.0.1:1", "--dense-ps", "127.0.0.1:2"]
    return []


CASES = [("embedding-ps", "gRPC"), ("embedding-ps", "/metrics"), ("dense-ps", "gRPC"), ("dense-ps", "/metrics"),
         ("serving", "gRPC")]  # fmt: skip


@pytest.mark.parametrize(("role", "which"), CASES, ids=[f"{r} {w}" for r, w in CASES])
def test_a_busy_port_is_one_line_and_exit_1(tmp_path: Path, busy_port: int, role: str, which: str) -> None:
    ports = ["--port", str(busy_port), "--metrics-port", "0"]
    if which == "/metrics":
        ports = ["--port", "0", "--metrics-port", str(busy_port)]

    returncode, stderr = _run(role, *_role_args(role, tmp_path), "--host", "127.0.0.1", *ports)

    _assert_one_line(role, returncode, stderr, f"cannot listen for {which} on 127.0.0.1:{busy_port}",
                     "Address already in use")  # fmt: skip


def test_a_trainer_with_no_dense_ps_is_one_line_and_exit_1(dead_port: int) -> None:
    returncode, stderr = _run("trainer", "--embedding-ps", f"127.0.0.1:{dead_port}",
                              "--dense-ps", f"127.0.0.1:{dead_port}", "--limit", "300")  # fmt: skip

    _assert_one_line("trainer", returncode, stderr, f"dense-PS at 127.0.0.1:{dead_port}", "UNAVAILABLE")


def test_a_trainer_with_no_embedding_ps_is_one_line_and_exit_1(dead_port: int) -> None:
    dense: MonolithServer = build_dense_ps(
        DenseStore(load_model_config(default_config_path()).model.optimizer), ServerConfig(port=0, metrics_port=None)
    )
    dense.start()
    try:
        returncode, stderr = _run("trainer", "--embedding-ps", f"127.0.0.1:{dead_port}",
                                  "--dense-ps", dense.address, "--limit", "300")  # fmt: skip
    finally:
        dense.stop(grace=0)

    _assert_one_line("trainer", returncode, stderr, f"embedding-PS shard 0 (127.0.0.1:{dead_port})", "UNAVAILABLE")


def test_a_joiner_quality_window_out_of_range_is_one_line_and_exit_2(dead_port: int) -> None:
    returncode, stderr = _run("joiner", "--nats", f"nats://127.0.0.1:{dead_port}", "--quality-window", "5",
                              "--port", "0", "--metrics-port", "0")  # fmt: skip

    _assert_one_line("joiner", returncode, stderr, "invalid config: quality_window", "greater than or equal to 100",
                     code=2)  # fmt: skip
