"""`monolith embedding-ps` as a process: serves until SIGTERM, exits 0; bad config exits 2."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.processes import MONOLITH, Command
from helpers.waiting import wait_for
from monolith.common.process import free_port
from monolith.embedding_ps.client import ShardedEmbeddingClient

SERVICE = "monolith.api.embedding_ps.v1.EmbeddingPS"
CONFIG = """\
features:
  - name: user
    dim: 8
    admission: {filter: counting, threshold: 2}
  - name: item
    dim: 8
    optimizer: {kind: adagrad}
    source: movie_id  # a key of the data source, ignored by the tables
"""


def _serving(channel: grpc.Channel) -> bool:
    request = health_pb2.HealthCheckRequest(service=SERVICE)
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def _run(tmp_path: Path, config: str, *flags: str) -> Command:
    path = tmp_path / "model.yaml"
    path.write_text(config)
    command = [MONOLITH, "embedding-ps", "--config", str(path), "--host", "127.0.0.1", "--metrics-port", "0", *flags]
    return Command(command, tmp_path)


def test_serves_a_lookup_then_exits_0_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    with _run(tmp_path, CONFIG, "--shard", "0", "--num-shards", "1", "--port", str(port)) as proc:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:

            def serving() -> bool:
                assert proc.alive(), proc.describe()
                return _serving(channel)

            wait_for(serving, "SERVING", timeout=20)
        with ShardedEmbeddingClient([f"127.0.0.1:{port}"], {"user": 8, "item": 8}, timeout=10) as client:
            trained = client.lookup({"user": np.array([5, 5, 6]), "item": np.array([7])}, training=True)
            served = client.lookup({"user": np.array([6, 5]), "item": np.array([7])})
            (stats,) = client.stats()

        exited = proc.stop(timeout=15)  # SIGTERM; a SIGKILL after 15 s would exit with -9

    assert trained["user"][0].any() and not trained["user"][2].any()  # 2 sightings admit, 1 does not
    np.testing.assert_array_equal(served["user"], np.stack([trained["user"][2], trained["user"][0]]))
    np.testing.assert_array_equal(served["item"], trained["item"])
    assert [(s.table, s.rows, s.pending_ids) for s in stats.tables] == [("user", 1, 1), ("item", 1, 0)]
    assert (stats.shard, stats.num_shards, stats.role) == (0, 1, "training")
    assert exited.code == 0, exited.stderr
    assert "received SIGTERM" in exited.stderr


@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        ("features:\n  - name: user\n    dim: -1\n", (), "features[0].dim: input should be greater than or equal to 1, got -1"),
        (CONFIG + "  - name: user\n", (), "features[2].name: duplicate feature name 'user'"),
        ("features:\n  - name: user\n    optimizer: {kind: rmsprop}\n", (), "features[0].optimizer.kind"),
        ("features: [\n", (), "not valid YAML"),
        (CONFIG, ("--shard", "1", "--num-shards", "1"), "shard: must be in 0..0, got 1"),
    ],
    ids=["negative dim", "duplicate feature", "unknown optimizer", "not yaml", "shard out of range"],
)
def test_bad_config_exits_2_naming_the_field(tmp_path: Path, config: str, flags: tuple[str, ...], message: str) -> None:
    flags = flags or ("--shard", "0", "--num-shards", "1")
    exited = _run(tmp_path, config, *flags, "--port", str(free_port())).wait(timeout=15)

    assert exited.code == 2, exited.stderr
    assert message in exited.stderr
    assert exited.stderr.strip().startswith("monolith embedding-ps:")
