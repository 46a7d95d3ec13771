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
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.metrics import read_metrics
from helpers.processes import MONOLITH, Command, pid_alive
from helpers.waiting import wait_for
from monolith.harness.manifest import StackError, StackManifest
from monolith.harness.stack.health import GrpcHealth, HttpOk

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


def _manifest(path: str) -> StackManifest | None:
    try:
        return StackManifest.load(path)
    except StackError:
        return None  # not written yet, or the stale one of the SIGKILLed stack


@dataclasses.dataclass
class Stack:
    up: Command
    data_dir: Path
    manifest: StackManifest

    def output(self) -> str:
        """What `monolith up` printed on stdout: its own lines and its supervisor's reports."""
        return self.up.stdout()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("stack")
    # Leftovers of an earlier stack that was SIGKILLed: its stack.json names a dead process.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (data_dir / "stack.json").write_text(json.dumps({"pid": dead.pid}))
    (data_dir / "logs").mkdir()
    (data_dir / "logs" / "earlier.log").write_text("from an earlier stack\n")
    up = Command([MONOLITH, "up", "--data-dir", str(data_dir), "--fresh", *FREE_PORTS], tmp_path_factory.mktemp("up"))
    try:
        manifest_path = str(data_dir / "stack.json")

        def written() -> StackManifest | None:
            assert up.alive(), f"monolith up exited with {up.process.returncode}: {up.describe()}"
            manifest = _manifest(manifest_path)
            return manifest if manifest is not None and manifest.pid == up.pid else None

        manifest = wait_for(written, f"stack.json (monolith up's output: {up.stdout_path})", timeout=START_TIMEOUT,
                            interval=0.2)  # fmt: skip
        yield Stack(up, data_dir, manifest)
    finally:
        up.stop(timeout=120)


def _run_up(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MONOLITH, "up", *args], check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--partitions", "0"], "argument --partitions: input should be greater than or equal to 1, got 0"),
        (["--serving-port", "70000"], "argument --serving-port: must be in 0..65535"),
        (["--sync-interval", "0"], "argument --sync-interval: must be a number of seconds > 0"),
        (["--checkpoint-interval", "-5"], "argument --checkpoint-interval: must be a finite number of seconds >= 0, got '-5'"),
        (["--nats-port", "4222", "--joiner-port", "4222"], "--nats-port, --joiner-port and --serving-port must differ"),
        (["--tls-cert", "/dev/null"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "/no/such.crt", "--tls-key", "/dev/null"], "--tls-cert /no/such.crt: not a readable file"),
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
    for url in m.metrics.values():
        read_metrics(url, timeout=10)  # answers, with a page Prometheus can parse


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
    assert f"a stack is already running from {stack.data_dir} (pid {stack.up.pid})" in result.stderr
    assert StackManifest.load(str(stack.data_dir / "stack.json")) == stack.manifest


def test_a_killed_embedding_ps_is_restarted_on_its_address(stack) -> None:
    address = stack.manifest.serving_shards[0]
    port = address.rsplit(":", 1)[1]

    def shard_pids() -> list[int]:
        return [pid for pid, cmd in children(stack.up.pid).items() if "embedding-ps" in cmd and f"--port {port}" in cmd]

    [old] = shard_pids()
    os.kill(old, signal.SIGKILL)

    wait_for(lambda: shard_pids() not in ([], [old]), "the shard restarted", timeout=30, interval=0.2)
    wait_for(lambda: GrpcHealth(address).ready(), "the restarted shard SERVING", timeout=120, interval=0.2)
    wait_for(lambda: "embedding-ps-serving-0 ready again after restart 1" in stack.output(), "reported", timeout=30,
             interval=0.2)
    assert "embedding-ps-serving-0 exited with signal SIGKILL; restart 1 in" in stack.output()
    assert stack.up.alive()


def test_a_killed_training_shard_is_restored_by_the_controller(stack) -> None:
    address = stack.manifest.training_shards[0]
    port = address.rsplit(":", 1)[1]

    def shard_pids() -> list[int]:
        return [pid for pid, cmd in children(stack.up.pid).items() if "embedding-ps" in cmd and f"--port {port}" in cmd]

    [old] = shard_pids()
    os.kill(old, signal.SIGKILL)

    wait_for(lambda: shard_pids() not in ([], [old]), "the shard restarted", timeout=30, interval=0.2)
    # It comes back awaiting a restore (NOT_SERVING); SERVING means the controller restored it.
    wait_for(lambda: GrpcHealth(address).ready(), "the restarted shard restored and SERVING", timeout=120,
             interval=0.2)
    log = (Path(stack.manifest.logs) / "controller.log").read_text()
    assert "recovering: training shard 0 awaits a restore" in log
    assert stack.up.alive()


def test_sigterm_stops_every_part_last_started_first_and_removes_stack_json(stack) -> None:
    parts = children(stack.up.pid)
    assert len(parts) == 10, parts  # nats, 4 shards, dense-PS, joiner, controller, trainer, serving

    code = stack.up.stop(timeout=120).code  # SIGTERM; a SIGKILL after 120 s would exit with -9

    assert code == 0, stack.up.describe()
    assert not (stack.data_dir / "stack.json").exists()
    assert not [pid for pid in parts if pid_alive(pid)]
    stops = [line.split()[0] for line in stack.output().splitlines() if " stopped (" in line]
    assert stops[0] == "serving" and stops[-1] == "nats", stops
    assert stack.output().splitlines()[-1] == "monolith up: stopped"
