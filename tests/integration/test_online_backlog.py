"""The online trainer under a backlog, against a real nats-server, real parameter servers and
a real controller: it drains in large steps, applies every sample once, and a cut taken
mid-backlog is restored exactly.
"""

from __future__ import annotations



from helpers.online import DEADLINE, ControlledStack, samples
from helpers.tables import exported_rows
from helpers.waiting import wait_for
from monolith.checkpoint.restore import merged_tables
from monolith.trainer.online import DEFAULT_MAX_BATCH

BACKLOG = 10_000


def checkpoint_rows(controlled_stack: ControlledStack, checkpoint_id: str) -> dict[str, dict[int, bytes]]:
    """A checkpoint's rows, as `exported_rows` shows a shard's: table -> id -> values and update time bytes."""
    return {
        table: {int(i): rows.values[k].tobytes() + rows.update_times[k].tobytes() for k, i in enumerate(rows.ids)}
        for table, rows in merged_tables(controlled_stack.store, controlled_stack.store.chain(checkpoint_id)).items()
        if rows.ids.shape[0]
    }


def test_a_backlog_drains_in_large_steps_once_each_and_a_cut_mid_backlog_restores_exactly(
    controlled_stack: ControlledStack,
) -> None:
    last = controlled_stack.stream.publish(samples(0, BACKLOG))  # waiting before the trainer starts
    trainer = controlled_stack.trainer("trainer-1", control=True)
    controller = controlled_stack.controller(trainer)
    try:
        wait_for(lambda: controller.watch_once() is None and controller.adopted, "the controller adopted the cluster",
                 timeout=DEADLINE)  # fmt: skip
        wait_for(lambda: controlled_stack.stream.consumer("trainer")[0] > 0, "the first step", timeout=DEADLINE, interval=0.01)
        # A cut while most of the backlog waits: between two steps, at an exact position.
        cut = controller.checkpoint()
        floor = cut.stream["ack_floor"]
        assert 0 < floor < last, cut.stream

        wait_for(lambda: controlled_stack.all_acked(last), "the backlog trained", timeout=DEADLINE)
        metrics = trainer.metrics()
        steps, examples = metrics.sum("monolith_trainer_steps"), metrics.sum("monolith_trainer_examples")
        # Every sample once (the trainer's own count against the stream's floor), in steps that
        # took what was waiting: the mean step is large, not one sample.
        assert examples == BACKLOG == metrics.sum("monolith_trainer_samples_since_rollback")
        assert steps <= 4 * BACKLOG / DEFAULT_MAX_BATCH, (steps, examples)

        # kill -9 of the trainer and of training shard 0 (restarted empty): the controller rolls
        # every parameter server back to the last cut, row for row, and the consumer with it.
        trainer.kill()
        controlled_stack.restart_shard(0)
        assert controller.watch_once().startswith("restored")
        assert exported_rows(controlled_stack.cluster.shards) == checkpoint_rows(controlled_stack, cut.id)
        assert controlled_stack.stream.consumer("trainer") == (floor, last - floor, 0)

        # A new trainer trains exactly the samples after the cut, once.
        replacement = controlled_stack.trainer("trainer-2", control=True)
        controller.set_trainers([replacement.control])
        wait_for(lambda: controlled_stack.all_acked(last), "the samples after the cut trained again", timeout=DEADLINE)
        assert replacement.metric("monolith_trainer_examples") == last - floor
    finally:
        controller.close()
