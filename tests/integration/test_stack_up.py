"""`monolith up`: the whole stack as processes, started once for this module.

It comes up with every part answering where stack.json says, restarts a part killed with
SIGKILL on the same address, refuses a second stack on the same data dir, and on SIGTERM
stops every part, removes stack.json and exits 0. Bad flags and a part that cannot start
fail with one clear message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from monolith.harness.manifest import StackError, StackManifest
from monolith.harness.stack.health import GrpcHealth, HttpOk

MONOLITH = str(Path(sys.executable).with_name("monolith"))
START_TIMEOUT = 300.0  # nine processes importing TensorFlow and gRPC on a loaded 2-core machine
FREE_PORTS = ("--serving-port", "0", "--joiner-port", "0", "--nats-port", "0")


def children(pid: int) -> dict[int, str]:
    """The live child processes of `pid`: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue  # it exited while we looked
        if int(ppid) == pid and state != "Z":
            found[int(entry)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)


def _manifest(path: str) -> StackManifest | None:
    try:
        return StackManifest.load(path)
    except StackError:
        return None  # not written yet, or the stale one of the SIGKILLed stack


@dataclasses.dataclass
class Stack:
    process: subprocess.Popen[bytes]
    data_dir: Path
    output_path: Path
    manifest: StackManifest

    def output(self) -> str:
        return self.output_path.read_text()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("stack")
    # Leftovers of an earlier stack that was SIGKILLed: its stack.json names a dead process.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (data_dir / "stack.json").write_text(json.dumps({"pid": dead.pid}))
    (data_dir / "logs").mkdir()
    (data_dir / "logs" / "earlier.log").write_text("from an earlier stack\n")
    output_path = data_dir / "up.out"
    with open(output_path, "wb") as out:
        process = subprocess.Popen(
            [MONOLITH, "up", "--data-dir", str(data_dir), "--fresh", *FREE_PORTS], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        manifest_path = str(data_dir / "stack.json")
        while (manifest := _manifest(manifest_path)) is None or manifest.pid != process.pid:
            assert process.poll() is None, f"monolith up exited with {process.returncode}:\n{output_path.read_text()}"
            assert time.monotonic() < deadline, f"no stack.json in {START_TIMEOUT:g} s:\n{output_path.read_text()}"
            time.sleep(0.2)
        yield Stack(process, data_dir, output_path, manifest)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _run_up(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MONOLITH, "up", *args], check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--partitions", "0"], "argument --partitions: input should be greater than or equal to 1, got 0"),
        (["--serving-port", "70000"], "argument --serving-port: must be in 0..65535"),
        (["--sync-interval", "0"], "argument --sync-interval: must be a number of seconds > 0"),
        (["--nats-port", "4222", "--joiner-port", "4222"], "--nats-port, --joiner-port and --serving-port must differ"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(tmp_path, flags, message) -> None:
    result = _run_up("--data-dir", str(tmp_path / "stack"), *flags)

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "stack" / "stack.json").exists()


def test_a_bad_config_exits_2_before_anything_starts(tmp_path) -> None:
    config = tmp_path / "model.yaml"
    config.write_text("features: []\n")

    result = _run_up("--data-dir", str(tmp_path / "stack"), "--config", str(config), *FREE_PORTS)

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"monolith up: invalid config: {config}: features")
    assert not (tmp_path / "stack" / "logs").exists()


def test_a_taken_port_exits_1_naming_its_flag(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        result = _run_up("--data-dir", str(tmp_path), "--serving-port", str(port), "--joiner-port", "0", "--nats-port", "0")

    assert result.returncode == 1
    assert result.stderr.startswith(f"monolith up: --serving-port {port}: 127.0.0.1:{port} is taken")


def test_a_part_that_cannot_start_stops_the_others_and_is_named_with_its_log(tmp_path) -> None:
    (tmp_path / "nats").write_text("a file where JetStream's directory should be")

    result = _run_up("--data-dir", str(tmp_path), *FREE_PORTS)

    assert result.returncode == 1
    log = tmp_path / "logs" / "nats.log"
    assert f"monolith up: nats did not come up: exited with code 1; the last lines of {log}:" in result.stderr
    assert "    " in result.stderr.split(str(log), 1)[1]  # the log's tail, indented
    assert not (tmp_path / "stack.json").exists()
    stopped = [line for line in result.stdout.splitlines() if line.endswith(")") and " stopped (" in line]
    assert stopped, result.stdout  # the parts that had started (the training shards, dense-PS) were stopped


def test_every_part_answers_where_stack_json_says(stack) -> None:
    m = stack.manifest

    assert stack.output().startswith("monolith up: starting")  # the stale stack.json did not stop it
    assert not (stack.data_dir / "logs" / "earlier.log").exists()  # --fresh
    assert m.partitions == 8
    assert m.config.endswith("movielens.yaml") and os.path.isabs(m.config)
    grpc_addresses = [m.serving, m.joiner, m.dense_ps, m.controller, *m.training_shards, *m.serving_shards]
    assert len(set(grpc_addresses)) == 8
    for address in grpc_addresses:
        assert GrpcHealth(address).ready(timeout=10), address
    assert HttpOk(f"{m.nats_monitor}/healthz?js-enabled-only=true").ready(timeout=10)
    host, port = m.nats.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as nats:
        assert nats.recv(4) == b"INFO"  # the NATS protocol's greeting
    for name, url in m.metrics.items():
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200, name


def test_up_prints_where_each_part_listens_and_logs(stack) -> None:
    m = stack.manifest
    lines = stack.output().splitlines()
    logs = Path(m.logs)

    for name, metrics in m.metrics.items():
        line = next(line for line in lines if line.startswith(f"{name} "))
        assert f"metrics {metrics}" in line and f"log {logs / name}.log" in line
        assert (logs / f"{name}.log").exists()
    assert any(line.startswith("nats ") and m.nats in line for line in lines)
    assert any(f"gRPC {m.serving}" in line for line in lines if line.startswith("serving "))
    assert any(line.startswith("monolith up: ready in") for line in lines)


def test_a_second_stack_on_the_same_data_dir_is_refused(stack) -> None:
    result = _run_up("--data-dir", str(stack.data_dir), *FREE_PORTS)

    assert result.returncode == 1
    assert f"a stack is already running from {stack.data_dir} (pid {stack.process.pid})" in result.stderr
    assert StackManifest.load(str(stack.data_dir / "stack.json")) == stack.manifest


def test_a_killed_embedding_ps_is_restarted_on_its_address(stack) -> None:
    address = stack.manifest.serving_shards[0]
    port = address.rsplit(":", 1)[1]

    def shard_pids() -> list[int]:
        return [pid for pid, cmd in children(stack.process.pid).items() if "embedding-ps" in cmd and f"--port {port}" in cmd]

    [old] = shard_pids()
    os.kill(old, signal.SIGKILL)

    wait_for(lambda: shard_pids() not in ([], [old]), 30, "the shard restarted")
    wait_for(lambda: GrpcHealth(address).ready(), 120, "the restarted shard SERVING")
    wait_for(lambda: "embedding-ps-serving-0 ready again after restart 1" in stack.output(), 30, "reported")
    assert "embedding-ps-serving-0 exited with signal SIGKILL; restart 1 in" in stack.output()
    assert stack.process.poll() is None


def test_a_killed_training_shard_is_restored_by_the_controller(stack) -> None:
    address = stack.manifest.training_shards[0]
    port = address.rsplit(":", 1)[1]

    def shard_pids() -> list[int]:
        return [pid for pid, cmd in children(stack.process.pid).items() if "embedding-ps" in cmd and f"--port {port}" in cmd]

    [old] = shard_pids()
    os.kill(old, signal.SIGKILL)

    wait_for(lambda: shard_pids() not in ([], [old]), 30, "the shard restarted")
    # It comes back awaiting a restore (NOT_SERVING); SERVING means the controller restored it.
    wait_for(lambda: GrpcHealth(address).ready(), 120, "the restarted shard restored and SERVING")
    log = (Path(stack.manifest.logs) / "controller.log").read_text()
    assert "recovering: training shard 0 awaits a restore" in log
    assert stack.process.poll() is None


def test_sigterm_stops_every_part_last_started_first_and_removes_stack_json(stack) -> None:
    parts = children(stack.process.pid)
    assert len(parts) == 10, parts  # nats, 4 shards, dense-PS, joiner, controller, trainer, serving

    stack.process.send_signal(signal.SIGTERM)

    assert stack.process.wait(120) == 0, stack.output()
    assert not (stack.data_dir / "stack.json").exists()
    assert not [pid for pid in parts if alive(pid)]
    stops = [line.split()[0] for line in stack.output().splitlines() if " stopped (" in line]
    assert stops[0] == "serving" and stops[-1] == "nats", stops
    assert stack.output().splitlines()[-1] == "monolith up: stopped"
