"""`monolith embedding-ps --role serving --sync-from`: a serving process follows its
training process through kill -9 of either side."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Row, decode_export
from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.api.embedding_ps.v1 import embedding_ps_pb2_grpc as pb_grpc
from monolith.common.process import RoleProcess, free_port, wait_healthy
from monolith.embedding_ps.client import ShardedEmbeddingClient

CONFIG = """\
features:
  - name: user
    dim: 8
  - name: item
    dim: 8
    optimizer: {kind: sgd, learning_rate: 0.5}
"""
DIMS = {"user": 8, "item": 8}
CONVERGE_SECONDS = 10.0


class Node:
    """One embedding-PS process on a fixed port and metrics port, restartable."""

    def __init__(self, tmp_path: Path, name: str, *flags: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self._log = str(tmp_path / f"{name}.log")
        self._args = [
            "embedding-ps", "--shard", "0", "--num-shards", "1", "--config", str(tmp_path / "model.yaml"),
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port), *flags,
        ]  # fmt: skip
        self.process: RoleProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Node:
        self.process = RoleProcess(self._args, log_path=self._log)
        try:
            wait_healthy(self.address, timeout=30)
        except TimeoutError:
            raise AssertionError(f"{self.address} did not start:\n{self.log()}") from None
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.stop()  # closes the log

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log(self) -> str:
        return Path(self._log).read_text()

    def rows(self) -> dict[str, dict[int, Row]]:
        """Every row's embedding and update time, as a full export shows them."""
        with grpc.insecure_channel(self.address) as channel:
            chunks = pb_grpc.EmbeddingPSStub(channel).Export(pb.ExportRequest(), timeout=10)
            return decode_export(chunks)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return sample.value
        raise KeyError(name)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    (tmp_path / "model.yaml").write_text(CONFIG)
    made: list[Node] = []

    def make(name: str, *flags: str) -> Node:
        made.append(Node(tmp_path, name, *flags))
        return made[-1]

    yield make
    for node in reversed(made):  # followers first, so they do not log the outage
        node.stop()


def train(node: Node, offset: int) -> dict[str, np.ndarray]:
    """Creates 200 users and 100 items from `offset`, updates some; returns the ids."""
    ids = {"user": np.arange(offset, offset + 200), "item": np.arange(offset, offset + 100)}
    with ShardedEmbeddingClient([node.address], DIMS, timeout=10) as client:
        client.lookup(ids, training=True, update_time=time.time())
        grads = {"item": (ids["item"][:40], np.ones((40, 8), np.float32))}
        client.apply_gradients(grads, update_time=time.time())
    return ids


def wait_until(condition: Callable[[], bool], what: str, timeout: float = CONVERGE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.05)


def served(node: Node, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with ShardedEmbeddingClient([node.address], DIMS, timeout=10) as client:
        return client.lookup(ids)


def test_serving_follows_training_through_kills_of_either_side(nodes: Callable[..., Node]) -> None:
    training = nodes("training", "--role", "training").start()
    # No cap on what a full copy deletes: the training shard here restarts empty on purpose
    # (with --restore-required and a controller it would wait to be restored instead).
    serving = nodes("serving", "--role", "serving", "--sync-from", training.address, "--sync-interval", "0.05",
                    "--max-resync-delete-fraction", "1")  # fmt: skip
    serving.start()

    first = train(training, offset=0)
    wait_until(lambda: serving.rows() == training.rows(), "serving mirrors training")
    np.testing.assert_array_equal(served(serving, first)["item"], served(training, first)["item"])
    assert "first full copy" in serving.log()

    # A serving process restarted empty gets a full copy again.
    serving.kill()
    serving.start()
    wait_until(lambda: serving.rows() == training.rows(), "a restarted serving shard mirrors training")

    # The training process dies: serving keeps answering with what it has.
    before = served(serving, first)
    training.kill()
    wait_until(lambda: serving.metric("monolith_sync_failures_total") >= 3, "failed syncs counted")
    during = served(serving, first)
    for name in first:
        np.testing.assert_array_equal(during[name], before[name])

    # A new, empty training process (new incarnation) trained on other ids: serving
    # converges to it, dropping the rows only the dead process had.
    training.start()
    second = train(training, offset=10_000)
    wait_until(lambda: serving.rows() == training.rows(), "serving mirrors the restarted training shard")
    assert not served(serving, first)["user"].any()
    np.testing.assert_array_equal(served(serving, second)["user"], served(training, second)["user"])
    assert serving.metric("monolith_sync_full_resyncs_total") >= 2
    assert serving.metric("monolith_sync_rows_total") >= 300
    assert 0 <= serving.metric("monolith_sync_lag_seconds") < 60
    assert serving.log().count("failing: UNAVAILABLE") == 1  # one warning per outage


def test_sync_from_needs_the_serving_role(tmp_path: Path) -> None:
    (tmp_path / "model.yaml").write_text(CONFIG)
    command = [
        sys.executable, "-m", "monolith.cli", "embedding-ps", "--shard", "0", "--num-shards", "1",
        "--config", str(tmp_path / "model.yaml"), "--role", "training", "--sync-from", "127.0.0.1:1",
        "--port", str(free_port()), "--metrics-port", "0",
    ]  # fmt: skip

    done = subprocess.run(command, capture_output=True, text=True, timeout=30)

    assert done.returncode == 2, done.stderr
    assert "monolith embedding-ps: --sync-from needs --role serving" in done.stderr
