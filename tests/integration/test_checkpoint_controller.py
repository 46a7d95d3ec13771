"""The checkpoint controller against a real nats-server, real parameter servers and a real
online trainer process: consistent cuts while training, and recovery of a SIGKILLed
training shard (plus a trainer killed with it) that loses no sample and applies none twice.
"""

from __future__ import annotations


import numpy as np

from helpers.online import DEADLINE, ControlledStack, samples
from helpers.tables import exported_rows
from helpers.waiting import wait_for


def test_cuts_while_training_and_recovery_from_a_killed_shard_apply_every_sample_once(controlled_stack: ControlledStack) -> None:
    trainer = controlled_stack.trainer("trainer-1", control=True)
    controller = controlled_stack.controller(trainer)
    try:
        first = controlled_stack.stream.publish(samples(0, 200))
        wait_for(lambda: controlled_stack.all_acked(first), "the first samples trained", timeout=DEADLINE)
        wait_for(lambda: controller.watch_once() is None and controller.adopted, "the controller adopted the cluster",
                 timeout=DEADLINE)
        full = controller.checkpoint()
        assert full.kind == "full" and full.stream["ack_floor"] == first

        second = controlled_stack.stream.publish(samples(200, 100))
        # A cut while samples arrive: taken between two steps, at an exact position.
        during = controller.checkpoint()
        assert during.kind == "incremental" and first <= during.stream["ack_floor"] <= second
        wait_for(lambda: controlled_stack.all_acked(second), "the second samples trained", timeout=DEADLINE)
        cut = controller.checkpoint()
        assert cut.kind == "incremental" and cut.stream["ack_floor"] == second
        at_cut = exported_rows(controlled_stack.cluster.shards)
        dense_at_cut = controlled_stack.dense.store.snapshot()
        assert controller.store.verify()[-1].id == cut.id

        third = controlled_stack.stream.publish(samples(300, 100))
        wait_for(lambda: controlled_stack.all_acked(third), "the third samples trained", timeout=DEADLINE)
        undisturbed = exported_rows(controlled_stack.cluster.shards)
        assert undisturbed != at_cut

        # kill -9 of the trainer and of training shard 0, which the supervisor restarts empty.
        trainer.kill()
        controlled_stack.restart_shard(0)
        assert controller.watch_once().startswith("restored")
        # Every parameter server is back at the cut, row for row, and the consumer with it.
        assert exported_rows(controlled_stack.cluster.shards) == at_cut
        restored_dense = controlled_stack.dense.store.snapshot()
        assert restored_dense.version == dense_at_cut.version
        for name, value in dense_at_cut.tensors.items():
            np.testing.assert_array_equal(restored_dense.tensors[name], value)
        floor, pending, ack_pending = controlled_stack.stream.consumer("trainer")
        assert (floor, pending, ack_pending) == (second, third - second, 0)

        # A new trainer replays exactly the samples after the cut, once.
        replacement = controlled_stack.trainer("trainer-2", control=True)
        wait_for(lambda: controlled_stack.all_acked(third), "the samples after the cut trained again", timeout=DEADLINE)
        wait_for(lambda: controller.watch_once() is None, "the controller took the new trainer in", timeout=DEADLINE)
        assert replacement.metric("monolith_trainer_examples") == third - second
        after = exported_rows(controlled_stack.cluster.shards)
        assert {t: set(r) for t, r in after.items()} == {t: set(r) for t, r in undisturbed.items()}
        print(f"training pauses for the cuts: {[round(m.pause_seconds, 4) for m in (full, during, cut)]} s")
    finally:
        controller.close()

