"""`monolith trainer --mode online` against a real nats-server and real parameter servers:
every sample trained and acknowledged, bad samples dropped, NATS and dense-PS restarts
waited out, SIGTERM a clean stop, several trainers sharing one consumer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers.cluster import start_cluster
from helpers.online import DEADLINE, START, OnlineStack, samples
from helpers.waiting import wait_for
from monolith.api.joiner.v1 import joiner_pb2
from monolith.common.scrape import Scrape
from monolith.data.feature_ids import feature_ids
from monolith.model.config import ModelConfig


@pytest.fixture
def setup(tmp_path: Path, online_model: tuple[ModelConfig, str]) -> Iterator[OnlineStack]:
    made = OnlineStack(tmp_path, online_model, start_cluster(num_shards=2, tables=online_model[0].tables()))
    yield made
    made.close()


# --------------------------------------------------------------------------- tests


def test_every_sample_is_trained_and_acknowledged_and_bad_ones_are_dropped(setup: OnlineStack) -> None:
    good = samples(0, 300)
    bad = [("bad-1", b"\xff\xfe not a sample"), ("bad-2", joiner_pb2.Sample(request_id="bad-2").SerializeToString())]
    unknown = joiner_pb2.Sample.FromString(good[0][1])
    unknown.request_id = "bad-3"
    unknown.features["shoe_size"].values.append("44")
    setup.stream.publish(good[:150] + bad + [("bad-3", unknown.SerializeToString())])
    trainer = setup.trainer()
    last = setup.stream.publish(good[150:])

    wait_for(lambda: setup.all_acked(last), "every sample acknowledged", timeout=DEADLINE)

    def lag_refreshed() -> Scrape | None:
        page = trainer.metrics()
        lag = "monolith_trainer_consumer_lag"
        caught_up = page.sum("monolith_trainer_consumer_ack_floor") == last and page.has(lag) and page.sum(lag) == 0
        return page if caught_up else None

    metrics = wait_for(lag_refreshed, "lag metrics refreshed", timeout=DEADLINE)
    assert metrics.sum("monolith_trainer_examples") == 300
    assert metrics.sum("monolith_trainer_bad_samples", reason="malformed") == 1
    assert metrics.sum("monolith_trainer_bad_samples", reason="invalid") == 2  # a missing and an unknown feature
    assert metrics.sum("monolith_trainer_last_applied_sequence") == last
    assert metrics.sum("monolith_trainer_newest_event_time_seconds") == START + 299
    # The 153 messages waiting when the trainer started went in one step (micro-batching takes
    # what is there); the other 150 came while it started or ran, in one step or more.
    assert 1 <= metrics.sum("monolith_trainer_steps") <= 1 + 150
    assert metrics.sum("monolith_trainer_ready") == 1
    log = trainer.log()
    assert "bad sample at stream sequence" in log and "not a Sample" in log and "shoe_size" in log
    assert "Traceback" not in log

    # The trained ids are the ids serving computes: rows exist, bias terms (zeros at creation) moved.
    users = feature_ids("user_id", np.arange(40))
    rows = setup.cluster.client.lookup({"user_id": users, "user_id/bias": users})
    assert np.all(np.abs(rows["user_id"]).sum(axis=1) > 0)
    assert np.all(rows["user_id/bias"] != 0)
    # Rows carry event time: every table's clock is a sample's second, not today (0 on a shard
    # none of a table's ids route to, e.g. the age bucket all samples share).
    clocks = {t.newest_update_time for stats in setup.cluster.client.stats() for t in stats.tables} - {0}
    assert max(clocks) == START + 299 and min(clocks) >= START
    assert setup.dense.store.version > 1

    code, summary = trainer.stop()
    assert code == 0, trainer.log()[-3000:]
    assert (summary["examples"], summary["bad_samples"], summary["last_sequence"]) == (300, 3, last)


def test_the_trainer_waits_out_a_nats_restart_and_a_dense_ps_restart(setup: OnlineStack) -> None:
    trainer = setup.trainer()
    last = setup.stream.publish(samples(0, 100))
    wait_for(lambda: setup.all_acked(last), "the first samples acknowledged", timeout=DEADLINE)
    # A trickle: each lone sample trains without waiting for a full batch (or a redelivery).
    for i in range(100, 105):
        last = setup.stream.publish(samples(i, 1))
        wait_for(lambda: setup.all_acked(last), f"lone sample {i} acknowledged", timeout=10)

    # NATS goes away and comes back on the same port and store: the consumer's place is kept.
    setup.restart_nats()
    last = setup.stream.publish(samples(105, 95))
    wait_for(lambda: setup.all_acked(last), "samples published after the NATS restart acknowledged", timeout=DEADLINE)
    assert trainer.alive()

    # The dense-PS goes away: samples wait (in progress, not acked) and train once it is back.
    setup.dense.stop()
    last = setup.stream.publish(samples(200, 100))
    wait_for(lambda: trainer.metric("monolith_trainer_retries", dependency="ps") >= 2, "retries counted",
             timeout=DEADLINE)
    floor, _, _ = setup.stream.consumer("trainer")
    assert floor < last and trainer.alive()
    setup.dense.start()
    wait_for(lambda: setup.all_acked(last), "samples acknowledged once the dense-PS is back", timeout=DEADLINE)

    assert trainer.metric("monolith_trainer_examples") >= 300
    log = trainer.log()
    assert log.count("ps unavailable") == 1, log[-3000:]  # one line per outage
    assert "ps reachable again" in log

    # SIGTERM while a step waits for the dense-PS: a clean exit that acknowledges nothing more,
    # and the next trainer trains those samples.
    setup.dense.stop()
    acked = last
    last = setup.stream.publish(samples(300, 20))
    retries = trainer.metric("monolith_trainer_retries", dependency="ps")
    wait_for(lambda: trainer.metric("monolith_trainer_retries", dependency="ps") > retries, "a retry",
             timeout=DEADLINE)
    code, summary = trainer.stop()
    assert code == 0, trainer.log()[-3000:]
    assert summary["examples"] >= 300 and summary["last_sequence"] == acked
    assert setup.stream.consumer("trainer")[0] == acked
    assert "Traceback" not in trainer.log()
    setup.dense.start()
    setup.trainer("next")
    wait_for(lambda: setup.all_acked(last), "the handed-back samples trained by the next trainer", timeout=DEADLINE)


def test_trainers_sharing_a_consumer_split_the_samples(setup: OnlineStack) -> None:
    # Started while NATS is down: they wait for it instead of failing.
    setup.nats.stop()
    trainers = [setup.trainer(f"trainer-{i}", consumer="shared") for i in range(2)]
    wait_for(lambda: all("nats unavailable" in t.log() for t in trainers), "both trainers waiting for NATS",
             timeout=DEADLINE)
    setup.restart_nats()
    wait_for(lambda: all(t.metric("monolith_trainer_ready") == 1 for t in trainers), "both trainers ready",
             timeout=DEADLINE)
    last = 0
    for start in range(0, 400, 50):  # in chunks, while both are fetching
        last = setup.stream.publish(samples(start, 50))
    wait_for(lambda: setup.all_acked(last, "shared"), "every sample acknowledged", timeout=DEADLINE)

    summaries = [t.stop()[1] for t in trainers]
    assert sum(s["examples"] for s in summaries) >= 400
    assert all(s["examples"] > 0 for s in summaries), summaries
