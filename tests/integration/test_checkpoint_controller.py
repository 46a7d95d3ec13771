"""The checkpoint controller against a real nats-server, real parameter servers and a real
online trainer process: consistent cuts while training, and recovery of a SIGKILLed
training shard (plus a trainer killed with it) that loses no sample and applies none twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers.online import DEADLINE, ControlledStack, samples, small_model
from helpers.tables import exported_rows
from helpers.waiting import wait_for
from monolith.model.config import ModelConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelConfig, str]:
    return small_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def setup(tmp_path: Path, model: tuple[ModelConfig, str]) -> Iterator[ControlledStack]:
    made = ControlledStack(tmp_path, model)
    yield made
    made.close()


def test_cuts_while_training_and_recovery_from_a_killed_shard_apply_every_sample_once(setup: ControlledStack) -> None:
    trainer = setup.trainer("trainer-1", control=True)
    controller = setup.controller(trainer)
    try:
        first = setup.stream.publish(samples(0, 200))
        wait_for(lambda: setup.all_acked(first), "the first samples trained", timeout=DEADLINE)
        wait_for(lambda: controller.watch_once() is None and controller.adopted, "the controller adopted the cluster",
                 timeout=DEADLINE)
        full = controller.checkpoint()
        assert full.kind == "full" and full.stream["ack_floor"] == first

        second = setup.stream.publish(samples(200, 100))
        # A cut while samples arrive: taken between two steps, at an exact position.
        during = controller.checkpoint()
        assert during.kind == "incremental" and first <= during.stream["ack_floor"] <= second
        wait_for(lambda: setup.all_acked(second), "the second samples trained", timeout=DEADLINE)
        cut = controller.checkpoint()
        assert cut.kind == "incremental" and cut.stream["ack_floor"] == second
        at_cut = exported_rows(setup.cluster.shards)
        dense_at_cut = setup.dense.store.snapshot()
        assert controller.store.verify()[-1].id == cut.id

        third = setup.stream.publish(samples(300, 100))
        wait_for(lambda: setup.all_acked(third), "the third samples trained", timeout=DEADLINE)
        undisturbed = exported_rows(setup.cluster.shards)
        assert undisturbed != at_cut

        # kill -9 of the trainer and of training shard 0, which the supervisor restarts empty.
        trainer.kill()
        setup.restart_shard(0)
        assert controller.watch_once().startswith("restored")
        # Every parameter server is back at the cut, row for row, and the consumer with it.
        assert exported_rows(setup.cluster.shards) == at_cut
        restored_dense = setup.dense.store.snapshot()
        assert restored_dense.version == dense_at_cut.version
        for name, value in dense_at_cut.tensors.items():
            np.testing.assert_array_equal(restored_dense.tensors[name], value)
        floor, pending, ack_pending = setup.stream.consumer("trainer")
        assert (floor, pending, ack_pending) == (second, third - second, 0)

        # A new trainer replays exactly the samples after the cut, once.
        replacement = setup.trainer("trainer-2", control=True)
        wait_for(lambda: setup.all_acked(third), "the samples after the cut trained again", timeout=DEADLINE)
        wait_for(lambda: controller.watch_once() is None, "the controller took the new trainer in", timeout=DEADLINE)
        assert replacement.metric("monolith_trainer_examples") == third - second
        after = exported_rows(setup.cluster.shards)
        assert {t: set(r) for t, r in after.items()} == {t: set(r) for t, r in undisturbed.items()}
        print(f"training pauses for the cuts: {[round(m.pause_seconds, 4) for m in (full, during, cut)]} s")
    finally:
        controller.close()

