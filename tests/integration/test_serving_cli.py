"""`monolith serving` as a process, in front of `monolith embedding-ps`, `dense-ps` and `trainer` processes.

Serving starts before anything is trained: it must report NOT_SERVING (and answer Predict
with UNAVAILABLE) until the dense-PS holds parameters, then SERVING; the shipped example
client scores against it; SIGTERM stops it with exit code 0.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monolith.common.process import RoleProcess, free_port, wait_healthy
from monolith.model.config import default_config_path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "clients" / "python" / "example.py"
SERVICE = "tensorflow.serving.PredictionService"


@dataclasses.dataclass
class Processes:
    serving: RoleProcess
    address: str
    logs: Path
    not_serving_before_training: int  # health status seen before the dense-PS had parameters
    predict_before_training: tuple[grpc.StatusCode, str]
    trainer: tuple[int, str, str]  # exit code, stdout, stderr
    refused: tuple[int, str, str]  # `monolith serving --dense-sync-interval 0`


def _health(address: str, service: str = "") -> int | None:
    """The health status, or None while nothing answers."""
    with grpc.insecure_channel(address) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0).status
        except grpc.RpcError:
            return None


def _predict_status(address: str) -> tuple[grpc.StatusCode, str]:
    """The status of a well-formed Predict call for one example."""
    from monolith_client import MonolithClient, PredictError  # imports TensorFlow: only when needed

    with MonolithClient(address) as client:
        try:
            client.score(
                {"user_id": 196, "age": "45-49", "gender": "M", "occupation": "writer", "zip": "554"},
                {"movie_id": [242], "genres": [["Comedy"]]},
            )
        except PredictError as exc:
            return exc.code, exc.details
    return grpc.StatusCode.OK, ""


def _log(logs: Path, name: str) -> str:
    path = logs / name
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    logs = tmp_path_factory.mktemp("serving-cli")
    config = default_config_path()
    shards = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    dense = f"127.0.0.1:{free_port()}"
    address = f"127.0.0.1:{free_port()}"
    common = ["--config", config, "--host", "127.0.0.1", "--metrics-port", "0"]
    roles = [
        RoleProcess(["embedding-ps", "--shard", str(i), "--num-shards", "2", "--port", a.split(":")[1], *common],
                    log_path=str(logs / f"embedding-ps-{i}.log"))
        for i, a in enumerate(shards)
    ]  # fmt: skip
    roles.append(RoleProcess(["dense-ps", "--port", dense.split(":")[1], *common], log_path=str(logs / "dense.log")))
    serving_args = ["serving", "--embedding-ps", ",".join(shards), "--dense-ps", dense, "--host", "127.0.0.1"]
    serving = RoleProcess(
        [*serving_args, "--port", address.split(":")[1], "--metrics-port", "0", "--dense-sync-interval", "1"],
        log_path=str(logs / "serving.log"),
    )
    # Started alongside, to overlap its TensorFlow import with the others'.
    bad = subprocess.Popen(
        [sys.executable, "-m", "monolith.cli", *serving_args, "--port", str(free_port()), "--metrics-port", "0",
         "--dense-sync-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    trainer = None
    try:
        for a in (*shards, dense):
            wait_healthy(a, timeout=60)
        deadline = time.monotonic() + 60
        while (status := _health(address)) is None:
            assert serving.process.poll() is None, _log(logs, "serving.log")
            assert time.monotonic() < deadline, "serving did not answer health checks within 60 s"
            time.sleep(0.1)
        predict_before = _predict_status(address)

        trainer = subprocess.Popen(
            [sys.executable, "-m", "monolith.cli", "trainer", "--config", config, "--embedding-ps", ",".join(shards),
             "--dense-ps", dense, "--limit", "3000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        trainer_out, trainer_err = trainer.communicate(timeout=120)
        bad_out, bad_err = bad.communicate(timeout=60)
        yield Processes(
            serving, address, logs, status, predict_before,
            (trainer.returncode, trainer_out, trainer_err), (bad.returncode, bad_out, bad_err),
        )  # fmt: skip
    finally:
        for proc in (trainer, bad):
            if proc is not None and proc.poll() is None:
                proc.kill()
        serving.stop()
        for role in roles:
            role.stop()


def test_serving_is_not_serving_until_the_dense_ps_has_parameters(processes: Processes) -> None:
    assert processes.not_serving_before_training == health_pb2.HealthCheckResponse.NOT_SERVING
    code, details = processes.predict_before_training
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert "no dense parameters yet" in details


def test_serving_becomes_serving_once_trained(processes: Processes) -> None:
    code, _, stderr = processes.trainer
    assert code == 0, stderr[-3000:]

    wait_healthy(processes.address, timeout=30)
    wait_healthy(processes.address, timeout=5, service=SERVICE)
    assert processes.serving.process.poll() is None


def test_the_example_client_prints_three_scores(processes: Processes) -> None:
    from monolith_client import MonolithClient

    wait_healthy(processes.address, timeout=30)
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--address", processes.address],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout
    printed = []
    for line, movie in zip(lines, (242, 302, 377)):
        match = re.fullmatch(rf"movie {movie}: (0\.\d{{3}}|1\.000)", line)
        assert match, line
        printed.append(float(match.group(1)))
    # The same call from here: the example printed what the server answers.
    with MonolithClient(processes.address) as client:
        scores = client.score(
            user={"user_id": 196, "age": "45-49", "gender": "M", "occupation": "writer", "zip": "554"},
            candidates={
                "movie_id": [242, 302, 377],
                "genres": [["Comedy"], ["Crime", "Film-Noir", "Mystery", "Thriller"], ["Children's", "Comedy"]],
            },
        )
    np.testing.assert_allclose(printed, np.round(scores, 3), atol=1e-3 + 1e-9)
    assert len(set(printed)) > 1  # trained: the movies are told apart


def test_a_sync_interval_of_0_is_refused_with_exit_2(processes: Processes) -> None:
    code, stdout, stderr = processes.refused

    assert code == 2, stderr[-3000:]
    assert stdout == ""
    assert "monolith serving: error: argument --dense-sync-interval: must be a number of seconds > 0, got '0'" in stderr


def test_sigterm_stops_serving_with_exit_0(processes: Processes) -> None:
    # Last in the module: it ends the shared serving process.
    assert processes.serving.process.poll() is None, _log(processes.logs, "serving.log")

    code = processes.serving.stop(timeout=20)

    assert code == 0, _log(processes.logs, "serving.log")
    assert "received SIGTERM, shutting down" in _log(processes.logs, "serving.log")
    assert _health(processes.address) is None  # nothing listens any more
