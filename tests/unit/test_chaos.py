"""The fault-injection harness's parts that need no stack: finding a part's process, the lineage count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers.processes import Command
from monolith.controller.lineage import Lineage
from monolith.harness.chaos import ChaosError, target
from monolith.harness.manifest import StackManifest

MANIFEST = StackManifest(
    pid=os.getpid(),
    config="/conf/model.yaml",
    nats="nats://127.0.0.1:14222",
    nats_monitor="http://127.0.0.1:18222",
    partitions=8,
    sync_interval=1.0,
    join_window=3600.0,
    join_lateness=60.0,
    serving="127.0.0.1:18500",
    joiner="127.0.0.1:18600",
    dense_ps="127.0.0.1:18060",
    training_shards=("127.0.0.1:18051", "127.0.0.1:18052"),
    serving_shards=("127.0.0.1:18053", "127.0.0.1:18054"),
    metrics={
        "embedding-ps-training-0": "http://127.0.0.1:19090/metrics",
        "trainer": "http://127.0.0.1:19096/metrics",
        "dense-ps": "http://127.0.0.1:19095/metrics",
    },
    logs="/tmp/logs",
)


def test_a_part_is_found_among_the_children_by_the_port_on_its_command_line(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import sys, time; time.sleep(60)"]
    with (
        Command([*sleeper, "embedding-ps", "--port", "18051", "--metrics-port", "19090"], tmp_path) as shard,
        Command([*sleeper, "dense-ps", "--port", "18060", "--metrics-port", "19095"], tmp_path) as other,
    ):
        assert target(MANIFEST, "embedding-ps-training-0").pids(os.getpid()) == [shard.pid]
        assert target(MANIFEST, "dense-ps").pids(os.getpid()) == [other.pid]
        assert target(MANIFEST, "trainer").pids(os.getpid()) == []  # not running
        assert target(MANIFEST, "nats").flag == "--http_port" and target(MANIFEST, "nats").value == "18222"


def test_an_unknown_part_is_refused_with_the_stacks_parts() -> None:
    with pytest.raises(ChaosError, match="no part 'embedding-ps-training-7'.*dense-ps.*nats.*trainer"):
        target(MANIFEST, "embedding-ps-training-7")


@pytest.mark.parametrize(
    ("resume", "applied", "floor", "lost", "twice"),
    [(8, 992, 1000, 0, 0), (8, 990, 1000, 2, 0), (8, 995, 1000, 0, 3), (0, 0, 0, 0, 0)],
)
def test_the_lineage_counts_lost_and_twice_applied_updates(
    resume: int, applied: int, floor: int, lost: int, twice: int
) -> None:
    state = Lineage(resume_position=resume, applied=applied, ack_floor=floor, pending=0, ack_pending=0)
    assert (state.updates_lost, state.updates_applied_twice, state.drained) == (lost, twice, True)
    assert not Lineage(resume, applied, floor, pending=1, ack_pending=0).drained
