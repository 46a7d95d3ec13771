"""The checkpoint controller against a real nats-server, real parameter servers and a real
online trainer process: consistent cuts while training, and recovery of a SIGKILLed
training shard (plus a trainer killed with it) that loses no sample and applies none twice.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import start_cluster
from monolith.checkpoint.store import CheckpointStore
from monolith.common.process import RoleProcess, free_port
from monolith.common.server import ServerConfig
from monolith.controller.controller import CheckpointController
from monolith.controller.settings import ControllerSettings
from monolith.embedding_ps.service import build_embedding_ps
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig
from monolith.model.config import ModelConfig
from monolith.streams.config import SAMPLES_STREAM
from monolith.streams.nats_server import NatsServer
from monolith.streams.pull_consumer import ConsumerAdmin, ConsumerSettings
from test_online_trainer import PARTITIONS, DensePS, Stream, Trainer, all_acked, model, samples, wait_until  # noqa: F401


class ControlledTrainer(Trainer):
    """The online trainer process with its TrainerControl port."""

    def __init__(self, tmp: Path, name: str, config_path: str, shards: list[str], dense: str, nats: str) -> None:
        self.control_port = free_port()
        self.log_path = tmp / f"{name}.log"
        self.metrics_port = free_port()
        self.process = RoleProcess(
            ["trainer", "--mode", "online", "--config", config_path, "--embedding-ps", ",".join(shards),
             "--dense-ps", dense, "--nats", nats, "--partitions", str(PARTITIONS), "--host", "127.0.0.1",
             "--metrics-port", str(self.metrics_port), "--control-port", str(self.control_port)],
            log_path=str(self.log_path),
        )  # fmt: skip

    @property
    def control(self) -> str:
        return f"127.0.0.1:{self.control_port}"


class Setup:
    def __init__(self, tmp: Path, model_and_path: tuple[ModelConfig, str]) -> None:
        self.tmp = tmp
        self.config, self.config_path = model_and_path
        self.nats = NatsServer(str(tmp / "nats"), log_path=str(tmp / "nats.log")).start()
        self.cluster = start_cluster(num_shards=2, tables=self.config.tables())
        self.dense = DensePS(self.config)
        self.stream = Stream(self.nats.url)
        self.trainers: list[ControlledTrainer] = []
        self.control_port = free_port()
        self.store = CheckpointStore(str(tmp / "checkpoints"))
        self.extra_servers: list = []

    def trainer(self, name: str) -> ControlledTrainer:
        trainer = ControlledTrainer(self.tmp, name, self.config_path, self.cluster.addresses, self.dense.address,
                                    self.nats.url)  # fmt: skip
        self.trainers.append(trainer)
        return trainer

    def controller(self, trainer: ControlledTrainer) -> CheckpointController:
        admin = ConsumerAdmin(self.stream.config, ConsumerSettings(SAMPLES_STREAM, "samples.>", "trainer"))
        return CheckpointController(self.store, self.cluster.addresses, self.dense.address, [trainer.control],
                                    admin, ControllerSettings(full_every=5))  # fmt: skip

    def restart_shard(self, index: int) -> EmbeddingShard:
        """SIGKILL and restart of a training shard: empty, awaiting a restore, on the same port."""
        old = self.cluster.servers[index]
        port = old.port
        old.stop(grace=0)
        shard = EmbeddingShard(ShardConfig(shard=index, num_shards=2, role="training", tables=self.config.tables(),
                                           restore_required=True))  # fmt: skip
        server = build_embedding_ps(shard, ServerConfig(host="127.0.0.1", port=port, metrics_port=None))
        shard.on_restored = lambda: server.set_serving(True)
        server.start(serving=False)
        self.cluster.servers[index], self.cluster.shards[index] = server, shard
        return shard

    def close(self) -> None:
        for trainer in self.trainers:
            trainer.process.stop(timeout=5)
        self.stream.close()
        self.nats.stop()
        self.dense.stop()
        self.cluster.stop()


@pytest.fixture
def setup(tmp_path: Path, model: tuple[ModelConfig, str]) -> Iterator[Setup]:  # noqa: F811
    made = Setup(tmp_path, model)
    yield made
    made.close()
    shutil.rmtree(tmp_path / "nats", ignore_errors=True)


def rows(shards: list[EmbeddingShard]) -> dict[str, dict[int, bytes]]:
    out: dict[str, dict[int, bytes]] = {}
    for shard in shards:
        for c in shard.export(0, True):
            table = out.setdefault(c.table, {})
            for k, row_id in enumerate(c.rows.ids.tolist()):
                table[row_id] = c.rows.values[k].tobytes() + c.rows.update_times[k].tobytes()
    return out


def test_cuts_while_training_and_recovery_from_a_killed_shard_apply_every_sample_once(setup: Setup) -> None:
    trainer = setup.trainer("trainer-1")
    controller = setup.controller(trainer)
    try:
        first = setup.stream.publish(samples(0, 200))
        wait_until(all_acked(setup, first), "the first samples trained")  # type: ignore[arg-type]
        wait_until(lambda: controller.watch_once() is None and controller.adopted, "the controller adopted the cluster")
        full = controller.checkpoint()
        assert full.kind == "full" and full.stream["ack_floor"] == first

        second = setup.stream.publish(samples(200, 100))
        # A cut while samples arrive: taken between two steps, at an exact position.
        during = controller.checkpoint()
        assert during.kind == "incremental" and first <= during.stream["ack_floor"] <= second
        wait_until(all_acked(setup, second), "the second samples trained")  # type: ignore[arg-type]
        cut = controller.checkpoint()
        assert cut.kind == "incremental" and cut.stream["ack_floor"] == second
        at_cut = rows(setup.cluster.shards)
        dense_at_cut = setup.dense.store.snapshot()
        assert controller.store.verify()[-1].id == cut.id

        third = setup.stream.publish(samples(300, 100))
        wait_until(all_acked(setup, third), "the third samples trained")  # type: ignore[arg-type]
        undisturbed = rows(setup.cluster.shards)
        assert undisturbed != at_cut

        # kill -9 of the trainer and of training shard 0, which the supervisor restarts empty.
        trainer.process.process.kill()
        trainer.process.stop(timeout=5)
        setup.restart_shard(0)
        assert controller.watch_once().startswith("restored")
        # Every parameter server is back at the cut, row for row, and the consumer with it.
        assert rows(setup.cluster.shards) == at_cut
        restored_dense = setup.dense.store.snapshot()
        assert restored_dense.version == dense_at_cut.version
        for name, value in dense_at_cut.tensors.items():
            np.testing.assert_array_equal(restored_dense.tensors[name], value)
        floor, pending, ack_pending = setup.stream.consumer("trainer")
        assert (floor, pending, ack_pending) == (second, third - second, 0)

        # A new trainer replays exactly the samples after the cut, once.
        replacement = setup.trainer("trainer-2")
        wait_until(all_acked(setup, third), "the samples after the cut trained again")  # type: ignore[arg-type]
        wait_until(lambda: controller.watch_once() is None, "the controller took the new trainer in")
        assert replacement.metric("monolith_trainer_examples_total") == third - second
        after = rows(setup.cluster.shards)
        assert {t: set(r) for t, r in after.items()} == {t: set(r) for t, r in undisturbed.items()}
        print(f"training pauses for the cuts: {[round(m.pause_seconds, 4) for m in (full, during, cut)]} s")
    finally:
        controller.close()

