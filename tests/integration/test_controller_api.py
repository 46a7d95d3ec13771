"""The controller's gRPC API through its client and `monolith checkpoint save|restore`: a real
controller service over real parameter servers (no trainers, no stream: a batch-trained cluster)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers.cluster import Cluster, start_cluster
from helpers.online import DensePS, small_model
from helpers.tables import exported_rows
from monolith.api.controller.v1 import controller_pb2_grpc as pb_grpc
from monolith.checkpoint.store import CheckpointStore
from monolith.cli import main
from monolith.common.errors import NotFound
from monolith.common.server import MonolithServer, Service, ServerConfig, build_server
from monolith.controller.client import ControllerClient
from monolith.controller.controller import CheckpointController
from monolith.controller.servicer import SERVICE_NAME, ControllerServicer
from monolith.model.config import ModelConfig


class Setup:
    """Two training shards, a dense-PS and a controller serving its API, all in this process."""

    def __init__(self, tmp: Path, config: ModelConfig) -> None:
        self.cluster: Cluster = start_cluster(num_shards=2, tables=config.tables())
        self.dense = DensePS(config)
        self.dense.store.init({"w": np.ones((2, 2), np.float32)})
        self.controller = CheckpointController(CheckpointStore(str(tmp / "checkpoints")), self.cluster.addresses,
                                               self.dense.address, [], None)  # fmt: skip
        servicer = ControllerServicer(self.controller)
        self.server: MonolithServer = build_server(
            ServerConfig(host="127.0.0.1", port=0, metrics_port=None),
            [Service(SERVICE_NAME, lambda s: pb_grpc.add_ControllerServicer_to_server(servicer, s))],
        )
        self.server.start()
        assert self.controller.watch_once() == "adopted the running cluster"

    def train(self, first_id: int) -> None:
        ids = np.arange(first_id, first_id + 50, dtype=np.int64)
        self.cluster.client.lookup({"user_id": ids, "movie_id": ids}, training=True, update_time=1000.0)

    def close(self) -> None:
        self.server.stop(grace=0)
        self.controller.close()
        self.dense.stop()
        self.cluster.stop()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    config, _ = small_model(tmp_path)
    made = Setup(tmp_path, config)
    yield made
    made.close()


def test_a_checkpoint_taken_through_the_client_is_what_a_restore_brings_back(setup: Setup) -> None:
    setup.train(0)
    at_cut = exported_rows(setup.cluster.shards)

    with ControllerClient(setup.server.address) as client:
        info = client.checkpoint()
        assert info.kind == "full" and info.rows == sum(len(rows) for rows in at_cut.values()) > 0
        assert [c.id for c in client.checkpoints()] == [info.id]

        setup.train(1000)  # after the cut
        assert exported_rows(setup.cluster.shards) != at_cut
        restored = client.restore()

    assert restored.checkpoint.id == info.id
    assert exported_rows(setup.cluster.shards) == at_cut


def test_the_cli_saves_and_restores_through_the_controller(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.train(0)
    address = setup.server.address

    assert main(["checkpoint", "save", "--controller", address, "--json"]) == 0
    [saved] = json.loads(capsys.readouterr().out)
    assert saved["kind"] == "full" and saved["rows"] > 0

    assert main(["checkpoint", "restore", "--controller", address, "--id", saved["id"]]) == 0
    assert f"{saved['id']}" in capsys.readouterr().out


def test_an_unknown_checkpoint_is_not_found_and_changes_nothing(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    setup.train(0)
    before = exported_rows(setup.cluster.shards)

    with ControllerClient(setup.server.address) as client, pytest.raises(NotFound, match="no-such-checkpoint"):
        client.restore("no-such-checkpoint")
    assert main(["checkpoint", "restore", "--controller", setup.server.address, "--id", "no-such-checkpoint"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err

    assert exported_rows(setup.cluster.shards) == before
