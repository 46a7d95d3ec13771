"""`monolith embedding-ps --role serving --sync-from`: a serving process follows its
training process through kill -9 of either side."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers.cluster import Row, exported_rows
from helpers.metrics import read_metrics
from helpers.waiting import wait_for
from monolith.common.process import RoleProcess, free_port, wait_healthy
from monolith.embedding_ps.client import EmbeddingPSClient, ShardedEmbeddingClient

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
        with EmbeddingPSClient(self.address, timeout=10) as client:
            return exported_rows(client.export())

    def metric(self, name: str) -> float:
        page = read_metrics(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert page.has(name), f"{self.address} has no metric {name}"
        return page.sum(name)


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


def served(node: Node, ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with ShardedEmbeddingClient([node.address], DIMS, timeout=10) as client:
        return client.lookup(ids)


def test_serving_follows_training_through_kills_of_either_side(nodes: Callable[..., Node]) -> None:
    training = nodes("training", "--role", "training").start()
    # The training shard here restarts empty on purpose (with --restore-required and a
    # controller it would wait to be restored instead).
    serving = nodes("serving", "--role", "serving", "--sync-from", training.address, "--sync-interval", "0.05")
    serving.start()

    first = train(training, offset=0)
    wait_for(lambda: serving.rows() == training.rows(), "serving mirrors training", timeout=CONVERGE_SECONDS)
    np.testing.assert_array_equal(served(serving, first)["item"], served(training, first)["item"])
    assert "first full copy" in serving.log()

    # A serving process restarted empty gets a full copy again.
    serving.kill()
    serving.start()
    wait_for(lambda: serving.rows() == training.rows(),
             "a restarted serving shard mirrors training", timeout=CONVERGE_SECONDS)

    # The training process dies: serving keeps answering with what it has.
    before = served(serving, first)
    training.kill()
    wait_for(lambda: serving.metric("monolith_sync_failures_total") >= 3,
             "failed syncs counted", timeout=CONVERGE_SECONDS)
    during = served(serving, first)
    for name in first:
        np.testing.assert_array_equal(during[name], before[name])

    # A new, empty training process (new incarnation) trained on other ids: serving follows
    # it, and keeps serving the rows only the dead process had (a lost or rolled-back
    # training shard never shrinks serving), alarmed as a shard that lost its rows.
    old = serving.rows()
    training.start()
    second = train(training, offset=10_000)

    def follows_and_keeps() -> bool:
        now, new = serving.rows(), training.rows()
        return all(now[t] == {**old.get(t, {}), **new.get(t, {})} for t in {*old, *new})

    wait_for(follows_and_keeps, "serving follows the restarted training shard and keeps the old rows",
             timeout=CONVERGE_SECONDS)
    np.testing.assert_array_equal(served(serving, first)["user"], before["user"])
    np.testing.assert_array_equal(served(serving, second)["user"], served(training, second)["user"])
    assert serving.metric("monolith_sync_retained_rows") == sum(len(rows) for rows in old.values())
    assert serving.metric("monolith_sync_resync_deletions_refused_total") > 0
    assert "restarted without being restored" in serving.log()
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
