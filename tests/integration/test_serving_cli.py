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
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.processes import Command, Exited, ParameterServers, Role, run
from helpers.waiting import wait_for
from monolith.common.process import free_port, wait_healthy
from monolith.model.config import default_config_path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "clients" / "python" / "example.py"
SERVICE = "tensorflow.serving.PredictionService"


@dataclasses.dataclass
class Processes:
    serving: Role
    address: str
    not_serving_before_training: int  # health status seen before the dense-PS had parameters
    predict_before_training: tuple[grpc.StatusCode, str]
    trainer: Exited
    refused: Exited  # `monolith serving --dense-sync-interval 0`


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


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    logs = tmp_path_factory.mktemp("serving-cli")
    config = default_config_path()
    servers = ParameterServers.start(logs, config)
    address = f"127.0.0.1:{free_port()}"
    serving_args = ["serving", "--embedding-ps", ",".join(servers.shards), "--dense-ps", servers.dense,
                    "--host", "127.0.0.1"]  # fmt: skip
    serving = Role(logs, "serving", [*serving_args, "--port", address.split(":")[1], "--metrics-port", "0",
                                     "--dense-sync-interval", "1"])  # fmt: skip
    # Started alongside, to overlap its TensorFlow import with the others'.
    bad = Command([sys.executable, "-m", "monolith.cli", *serving_args, "--port", str(free_port()), "--metrics-port",
                   "0", "--dense-sync-interval", "0"], logs)  # fmt: skip
    try:
        servers.wait_healthy(timeout=60)

        def answering() -> int | None:
            assert serving.alive(), serving.describe()
            return _health(address)

        status = wait_for(answering, "serving to answer health checks", timeout=60)
        predict_before = _predict_status(address)

        trainer = run([sys.executable, "-m", "monolith.cli", "trainer", "--config", config, "--embedding-ps",
                       ",".join(servers.shards), "--dense-ps", servers.dense, "--limit", "3000"],
                      logs, timeout=120)  # fmt: skip
        yield Processes(serving, address, status, predict_before, trainer, bad.wait(timeout=60))
    finally:
        bad.stop()
        serving.stop()
        servers.stop()


def test_serving_is_not_serving_until_the_dense_ps_has_parameters(processes: Processes) -> None:
    assert processes.not_serving_before_training == health_pb2.HealthCheckResponse.NOT_SERVING
    code, details = processes.predict_before_training
    assert code == grpc.StatusCode.UNAVAILABLE, details
    assert "no dense parameters yet" in details


def test_serving_becomes_serving_once_trained(processes: Processes) -> None:
    assert processes.trainer.code == 0, processes.trainer.stderr[-3000:]

    wait_healthy(processes.address, timeout=30)
    wait_healthy(processes.address, timeout=5, service=SERVICE)
    assert processes.serving.alive()


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
    refused = processes.refused

    assert refused.code == 2, refused.stderr[-3000:]
    assert refused.stdout == ""
    assert "monolith serving: error: argument --dense-sync-interval: must be a number of seconds > 0, got '0'" in (
        refused.stderr
    )


def test_sigterm_stops_serving_with_exit_0(processes: Processes) -> None:
    # Last in the module: it ends the shared serving process.
    assert processes.serving.alive(), processes.serving.describe()

    code = processes.serving.stop(timeout=20)

    assert code == 0, processes.serving.describe()
    assert "received SIGTERM, shutting down" in processes.serving.log()
    assert _health(processes.address) is None  # nothing listens any more
