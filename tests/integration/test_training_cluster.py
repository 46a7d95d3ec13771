"""Training against real parameter servers: two asynchronous trainers on in-process PSs,
then `monolith trainer` as a process — killed mid-run, run to completion, and refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.cluster import Cluster, decode_export, start_cluster
from helpers.models import small_raw_config
from helpers.processes import Command, Exited, ParameterServers, Role
from helpers.waiting import wait_for
from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.api.embedding_ps.v1 import embedding_ps_pb2_grpc as pb_grpc
from monolith.common.errors import MonolithError
from monolith.common.server import MonolithServer, ServerConfig
from monolith.data.batch import Batch
from monolith.data.movielens import load_movielens
from monolith.dense_ps.client import DensePSClient
from monolith.dense_ps.service import build_dense_ps
from monolith.dense_ps.store import DenseStore
from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.embedding_ps.routing import route_to_shards
from monolith.model.config import ModelConfig, default_config_path, load_model_config, model_config_from_dict
from monolith.model.dense_model import DenseModel
from monolith.trainer.evaluation import evaluate
from monolith.trainer.worker import TrainerWorker

EMBEDDING_SERVICE = "monolith.api.embedding_ps.v1.EmbeddingPS"
DENSE_SERVICE = "monolith.api.dense_ps.v1.DensePS"
TRAIN, HELD_OUT = 6000, 8000


@pytest.fixture(scope="module")
def data() -> Batch:
    return load_movielens(limit=HELD_OUT)


def trainer_for(config: ModelConfig, shards: list[str], dense: str) -> TrainerWorker:
    """A worker with its own clients (closed with the process; tests are short)."""
    sparse = ShardedEmbeddingClient(shards, config.table_dims(), timeout=30)
    return TrainerWorker(config, sparse, DensePSClient(dense, timeout=30))


def check_health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


# --------------------------------------------------------------------------- in-process servers


@dataclasses.dataclass
class InProcess:
    config: ModelConfig
    cluster: Cluster
    dense_server: MonolithServer
    dense_store: DenseStore


@pytest.fixture(scope="module")
def in_process() -> Iterator[InProcess]:
    """Two embedding-PS shards and a dense-PS for the MovieLens model with one small hidden layer."""
    raw = small_raw_config()
    # Small batches: ~90 steps over the training examples, so one pass learns enough that
    # the held-out loss falls clearly whatever order the two trainers' steps interleave in.
    raw["training"]["batch_size"] = 64
    config = model_config_from_dict(raw)
    cluster = start_cluster(num_shards=2, tables=config.tables())
    store = DenseStore(config.model.optimizer)
    server = build_dense_ps(store, ServerConfig(host="127.0.0.1", port=0, metrics_port=None))
    server.start()
    yield InProcess(config, cluster, server, store)
    server.stop(grace=0)
    cluster.stop()


def test_two_asynchronous_trainers_lower_the_held_out_loss(in_process: InProcess, data: Batch) -> None:
    config, cluster = in_process.config, in_process.cluster
    workers = [trainer_for(config, cluster.addresses, in_process.dense_server.address) for _ in range(2)]
    train, held_out = data.slice(0, TRAIN), data.slice(TRAIN, HELD_OUT)
    batches = list(train.batches(config.training.batch_size))
    before = evaluate(workers[0], held_out)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            for batch in batches[index::2]:
                workers[index].train(batch)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    workers[0].refresh_dense()
    after = evaluate(workers[0], held_out)

    # Before any training no row exists, so every prediction is 0.5.
    assert before["log_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # One pass, as the paper trains; a second pass over 6,000 examples can overfit.
    assert after["log_loss"] < before["log_loss"] - 0.02, (before, after)
    assert after["auc"] > 0.65, after
    steps = [w.steps for w in workers]
    assert steps == [len(batches[0::2]), len(batches[1::2])]
    # Every push was applied: version 1 after init, plus one per step of either worker.
    assert in_process.dense_store.version == 1 + sum(steps)
    assert all(w.dense_version > 1 for w in workers)
    assert workers[0].dense_version == in_process.dense_store.version
    stats = cluster.client.stats()
    for feature in config.features:
        names = (feature.table.name, feature.bias_table.name)  # type: ignore[union-attr]
        for name in names:
            rows = [next(s.rows for s in shard.tables if s.table == name) for shard in stats]
            assert sum(rows) == len(np.unique(train.ids[feature.source])), name
            if feature.name in ("user_id", "movie_id"):
                assert all(r > 0 for r in rows), (name, rows)
    assert all(sum(s.rows for s in shard.tables) > 0 for shard in stats)


# --------------------------------------------------------------------------- role processes


@dataclasses.dataclass
class Processes:
    config_path: str
    servers: ParameterServers
    logs: Path

    @property
    def shards(self) -> list[str]:
        return self.servers.shards

    @property
    def dense(self) -> str:
        return self.servers.dense

    def trainer_command(self, *flags: str) -> list[str]:
        return ["trainer", "--config", self.config_path, "--embedding-ps", ",".join(self.shards),
                "--dense-ps", self.dense, *flags]  # fmt: skip


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """`monolith embedding-ps` x2 and `monolith dense-ps` as subprocesses on free ports."""
    tmp = tmp_path_factory.mktemp("cluster")
    config_path = str(tmp / "model.yaml")
    shutil.copyfile(default_config_path(), config_path)
    servers = ParameterServers.start(tmp, config_path)
    try:
        servers.wait_healthy(timeout=60)
        yield Processes(config_path, servers, tmp)
    finally:
        codes = servers.stop()
    assert codes == [0, 0, 0], codes


def test_a_trainer_killed_mid_run_leaves_the_servers_consistent(processes: Processes, data: Batch) -> None:
    trainer = Role(processes.logs, "trainer", processes.trainer_command("--limit", "20000"))
    config = load_model_config(processes.config_path)
    try:
        # Kill it once it has pushed to the dense-PS and to both shards (small batches may
        # route a first step's users to one shard only).
        with DensePSClient(processes.dense, timeout=10) as dense, ShardedEmbeddingClient(
            processes.shards, config.table_dims(), timeout=10
        ) as sparse:

            def pushed_to_every_server() -> bool:
                assert trainer.alive(), trainer.describe()
                try:
                    return dense.stats().version > 1 and all(
                        next(t.rows for t in shard.tables if t.table == "user_id") > 0 for shard in sparse.stats()
                    )
                except (grpc.RpcError, MonolithError):
                    return False

            wait_for(pushed_to_every_server, "the trainer to push to every server", timeout=60, interval=0.02)
        assert trainer.alive()  # still training
    finally:
        code = trainer.kill()
    assert code == -9

    for address in processes.shards:
        assert check_health(address, EMBEDDING_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert check_health(address, "") == health_pb2.HealthCheckResponse.SERVING
    assert check_health(processes.dense, DENSE_SERVICE) == health_pb2.HealthCheckResponse.SERVING

    with ShardedEmbeddingClient(processes.shards, config.table_dims(), timeout=10) as sparse:
        stats = sparse.stats()
    assert [(s.shard, s.num_shards, s.role) for s in stats] == [(0, 2, "training"), (1, 2, "training")]
    for shard in stats:
        assert [s.table for s in shard.tables] == [t.name for t in config.tables()]
        assert next(s.rows for s in shard.tables if s.table == "user_id") > 0

    dims = {t.name: (t.dim, t.dim + t.optimizer.state_width(t.dim)) for t in config.tables()}
    for index, address in enumerate(processes.shards):
        with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as channel:
            request = pb.ExportRequest(include_optimizer_state=True, max_rows_per_chunk=1000)
            chunks = list(pb_grpc.EmbeddingPSStub(channel).Export(request, timeout=30))
        exported = decode_export(iter(chunks))  # fails on an id exported twice
        assert {c.width for c in chunks if c.num_rows} <= {w for _, w in dims.values()}
        for chunk in chunks:
            if chunk.num_rows:
                assert chunk.width == dims[chunk.table][1], chunk.table
        stat_rows = {s.table: s.rows for s in stats[index].tables}
        assert set(exported) <= set(dims)
        for name, rows in exported.items():
            ids = np.array(list(rows), np.int64)
            values = np.array([v for v, _ in rows.values()], np.float64)
            assert len(ids) == stat_rows[name], name
            assert np.all(np.isfinite(values)), name
            owners = route_to_shards(ids, stable_hash64(name), 2)
            assert np.all(owners == index), f"shard {index} holds {name} ids of shard(s) {set(owners.tolist())}"

    with DensePSClient(processes.dense, timeout=10) as dense:
        version, tensors = dense.pull()
    shapes = DenseModel(config).parameter_shapes
    assert tensors is not None and version > 1
    assert {n: t.shape for n, t in tensors.items()} == shapes
    assert all(np.all(np.isfinite(t)) for t in tensors.values())

    worker = trainer_for(config, processes.shards, processes.dense)
    assert worker.dense_version >= version  # joined with the parameters the PS holds
    losses = [worker.train(batch).loss for batch in data.slice(0, 3 * 256).batches(256)]
    assert all(math.isfinite(loss) for loss in losses)
    with DensePSClient(processes.dense, timeout=10) as dense:
        stats_after = dense.stats()
    assert stats_after.version >= worker.dense_version >= version + 3
    assert stats_after.rejected_pushes == 0


def _trainer_cli(args: list[str], output_dir: Path) -> Command:
    return Command([sys.executable, "-m", "monolith.cli", *args], output_dir)


def test_a_trainer_run_exits_0_and_prints_a_json_summary_last(processes: Processes, tmp_path: Path) -> None:
    done = _trainer_cli(processes.trainer_command("--limit", "3000"), tmp_path).wait(timeout=120)

    assert done.code == 0, done.stderr[-3000:]
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary) == {"examples", "steps", "examples_per_s", "last_loss", "running_auc", "dense_version"}
    batch_size = load_model_config(processes.config_path).training.batch_size
    assert (summary["examples"], summary["steps"]) == (2400, math.ceil(2400 / batch_size))  # the first 80%
    assert summary["dense_version"] > summary["steps"]
    assert math.isfinite(summary["last_loss"]) and 0 < summary["last_loss"] < 1
    assert 0.5 < summary["running_auc"] < 1
    assert summary["examples_per_s"] > 0
    assert "[trainer 0/1] 2400/2400 examples" in done.stderr


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exited]:
    """Runs the refused trainer command lines concurrently (each imports TensorFlow)."""
    # Nothing listens at these addresses: a refusal must come before any connection.
    commands = {
        "online": ["trainer", "--embedding-ps", "127.0.0.1:1", "--dense-ps", "127.0.0.1:1", "--mode", "online"],
        "consumer": ["trainer", "--embedding-ps", "127.0.0.1:1", "--dense-ps", "127.0.0.1:1", "--mode", "online",
                     "--nats", "nats://127.0.0.1:1", "--consumer", "a.b"],
        "index": ["trainer", "--embedding-ps", "127.0.0.1:1", "--dense-ps", "127.0.0.1:1",
                  "--worker-index", "3", "--num-workers", "2"],
    }  # fmt: skip
    output_dir = tmp_path_factory.mktemp("refused")
    procs = {name: _trainer_cli(command, output_dir) for name, command in commands.items()}
    try:
        return {name: proc.wait(timeout=60) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stop()


def test_online_mode_without_nats_is_refused_with_exit_2(refused: dict[str, Exited]) -> None:
    refusal = refused["online"]

    assert refusal.code == 2, refusal.stderr
    assert refusal.stdout == ""
    assert "monolith trainer: --nats is required with --mode online" in refusal.stderr


def test_a_consumer_name_nats_cannot_hold_is_refused_with_exit_2(refused: dict[str, Exited]) -> None:
    refusal = refused["consumer"]

    assert refusal.code == 2, refusal.stderr
    assert refusal.stdout == ""
    assert "monolith trainer: --consumer must be 1-64 letters" in refusal.stderr


def test_a_worker_index_out_of_range_is_refused_with_exit_2(refused: dict[str, Exited]) -> None:
    refusal = refused["index"]

    assert refusal.code == 2, refusal.stderr
    assert refusal.stdout == ""
    assert "monolith trainer: --worker-index must be in 0..1, got 3" in refusal.stderr
