"""`monolith trainer --mode online` against a real nats-server and real parameter servers:
every sample trained and acknowledged, bad samples dropped, NATS and dense-PS restarts
waited out, SIGTERM a clean stop, several trainers sharing one consumer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from conftest import Cluster, start_cluster
from monolith.api.joiner.v1 import joiner_pb2
from monolith.common.process import RoleProcess, free_port
from monolith.common.server import MonolithServer, ServerConfig
from monolith.data.feature_ids import feature_ids
from monolith.dense_ps.service import build_dense_ps
from monolith.dense_ps.store import DenseStore
from monolith.model.config import ModelConfig, default_config_path, model_config_from_dict
from monolith.streams.config import SAMPLES_STREAM, StreamsConfig, partition_of, samples_subject
from monolith.streams.jetstream import BackgroundLoop, connect, ensure_streams
from monolith.streams.nats_server import NatsServer

PARTITIONS = 4
START = 880_000_000  # event times from MovieLens' months (1997-1998)
DEADLINE = 90.0  # seconds; the trainer's start (TensorFlow import) is most of it


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.05)


# --------------------------------------------------------------------------- parts


class Stream:
    """A test's own NATS connection: publishes samples and reads the trainers' consumer."""

    def __init__(self, url: str) -> None:
        self.config = StreamsConfig(url=url, partitions=PARTITIONS)
        self._loop = BackgroundLoop("test-nats")
        self._js: JetStreamContext | None = None
        self._nc = None

    def _context(self) -> JetStreamContext:
        if self._js is None:
            self._nc = self._loop.run(connect(self.config, "test", attempts=20), timeout=30)
            self._js = self._nc.jetstream()
            self._loop.run(ensure_streams(self._js, self.config), timeout=30)
        return self._js

    def publish(self, payloads: list[tuple[str, bytes]]) -> int:
        """Publishes (request_id, payload) pairs on their partitions; returns the last stream sequence."""
        js = self._context()

        async def publish_all() -> int:
            last = 0
            for request_id, payload in payloads:
                subject = samples_subject(partition_of(request_id, PARTITIONS))
                ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": f"smp/{request_id}"})
                last = ack.seq
            return last

        return self._loop.run(publish_all(), timeout=60)

    def consumer(self, name: str) -> tuple[int, int, int]:
        """(ack floor stream sequence, pending, ack pending) of a durable consumer; zeros before it exists."""
        js = self._context()

        async def info() -> tuple[int, int, int]:
            try:
                state = await js.consumer_info(SAMPLES_STREAM, name, timeout=2)
            except Exception:  # noqa: BLE001 - not there yet, or NATS restarting: ask again
                return 0, 0, 0
            return int(state.ack_floor.stream_seq), int(state.num_pending), int(state.num_ack_pending)

        return self._loop.run(info(), timeout=10)

    def close(self) -> None:
        if self._nc is not None:
            try:
                self._loop.run(self._nc.close(), timeout=5)
            except (TimeoutError, asyncio.TimeoutError):
                pass
        self._loop.close()


class DensePS:
    """A dense-PS in this process; a restart keeps its store (parameters) and its port."""

    def __init__(self, config: ModelConfig) -> None:
        self.store = DenseStore(config.model.optimizer)
        self.port = 0
        self.server: MonolithServer | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = build_dense_ps(self.store, ServerConfig(host="127.0.0.1", port=self.port, metrics_port=None))
        self.server.start()
        self.port = self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0)
            self.server = None


class Trainer:
    """`monolith trainer --mode online` as a process, with its /metrics."""

    def __init__(self, tmp: Path, name: str, config_path: str, shards: list[str], dense: str, nats: str,
                 consumer: str = "trainer") -> None:  # fmt: skip
        self.log_path = tmp / f"{name}.log"
        self.metrics_port = free_port()
        self.process = RoleProcess(
            ["trainer", "--mode", "online", "--config", config_path, "--embedding-ps", ",".join(shards),
             "--dense-ps", dense, "--nats", nats, "--partitions", str(PARTITIONS), "--consumer", consumer,
             "--host", "127.0.0.1", "--metrics-port", str(self.metrics_port)],
            log_path=str(self.log_path),
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics by name with labels, e.g. 'monolith_trainer_bad_samples_total{reason=invalid}'."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return {}
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def alive(self) -> bool:
        return self.process.process.poll() is None

    def stop(self) -> tuple[int, dict]:
        """SIGTERM; returns (exit code, the JSON summary it printed last)."""
        code = self.process.stop(timeout=30)
        lines = [line for line in self.log().splitlines() if line.startswith("{")]
        return code, (json.loads(lines[-1]) if lines else {})


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelConfig, str]:
    """The MovieLens model with one small hidden layer, and its YAML path for the trainers."""
    with open(default_config_path(), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    raw["model"]["hidden_units"] = [16]
    path = tmp_path_factory.mktemp("model") / "model.yaml"
    path.write_text(yaml.safe_dump(raw))
    return model_config_from_dict(raw), str(path)


class Setup:
    def __init__(self, tmp: Path, model: tuple[ModelConfig, str]) -> None:
        self.tmp = tmp
        self.config, self.config_path = model
        self.nats = NatsServer(str(tmp / "nats"), log_path=str(tmp / "nats.log")).start()
        self.cluster: Cluster = start_cluster(num_shards=2, tables=self.config.tables())
        self.dense = DensePS(self.config)
        self.stream = Stream(self.nats.url)
        self.trainers: list[Trainer] = []

    def trainer(self, name: str = "trainer", consumer: str = "trainer") -> Trainer:
        trainer = Trainer(self.tmp, name, self.config_path, self.cluster.addresses, self.dense.address,
                          self.nats.url, consumer)  # fmt: skip
        self.trainers.append(trainer)
        return trainer

    def restart_nats(self) -> None:
        """Stops NATS (if it runs) and starts it again on the same port and store."""
        down = self.nats
        down.stop()
        self.nats = NatsServer(down.data_dir, down.port, down.monitor_port, down.log_path).start()

    def close(self) -> None:
        for trainer in self.trainers:
            trainer.process.stop(timeout=5)
        self.stream.close()
        self.nats.stop()
        self.dense.stop()
        self.cluster.stop()


@pytest.fixture
def setup(tmp_path: Path, model: tuple[ModelConfig, str]) -> Iterator[Setup]:
    made = Setup(tmp_path, model)
    yield made
    made.close()
    shutil.rmtree(tmp_path / "nats", ignore_errors=True)


def samples(first: int, count: int) -> list[tuple[str, bytes]]:
    """(request_id, serialized Sample): 40 users x 25 movies, one event per second of 1997 time."""
    out = []
    for i in range(first, first + count):
        sample = joiner_pb2.Sample(request_id=f"req-{i}", item_id=str(i % 25), label=float(i % 3 == 0),
                                   event_time=START + i + 0.25, sample_rate=1.0)  # fmt: skip
        values = {"user_id": [str(i % 40)], "movie_id": [str(i % 25)], "age": ["25-34"], "gender": ["MF"[i % 2]],
                  "occupation": ["writer"], "zip": ["554"], "genres": ["Comedy", "Drama"][: 1 + i % 2]}  # fmt: skip
        for name, texts in values.items():
            sample.features[name].values.extend(texts)
        out.append((sample.request_id, sample.SerializeToString()))
    return out


def all_acked(setup: Setup, last: int, consumer: str = "trainer") -> Callable[[], bool]:
    def check() -> bool:
        floor, pending, ack_pending = setup.stream.consumer(consumer)
        return floor >= last and pending == 0 and ack_pending == 0

    return check


# --------------------------------------------------------------------------- tests


def test_every_sample_is_trained_and_acknowledged_and_bad_ones_are_dropped(setup: Setup) -> None:
    good = samples(0, 300)
    bad = [("bad-1", b"\xff\xfe not a sample"), ("bad-2", joiner_pb2.Sample(request_id="bad-2").SerializeToString())]
    unknown = joiner_pb2.Sample.FromString(good[0][1])
    unknown.request_id = "bad-3"
    unknown.features["shoe_size"].values.append("44")
    setup.stream.publish(good[:150] + bad + [("bad-3", unknown.SerializeToString())])
    trainer = setup.trainer()
    last = setup.stream.publish(good[150:])

    wait_until(all_acked(setup, last), "every sample acknowledged")
    wait_until(lambda: trainer.metric("monolith_trainer_consumer_lag") == 0
               and trainer.metric("monolith_trainer_consumer_ack_floor") == last, "lag metrics refreshed")  # fmt: skip
    metrics = trainer.metrics()
    assert metrics["monolith_trainer_examples_total"] == 300
    assert metrics["monolith_trainer_bad_samples_total{reason=malformed}"] == 1
    assert metrics["monolith_trainer_bad_samples_total{reason=invalid}"] == 2  # a missing and an unknown feature
    assert metrics["monolith_trainer_last_applied_sequence"] == last
    assert metrics["monolith_trainer_newest_event_time_seconds"] == START + 299
    assert metrics["monolith_trainer_steps_total"] >= 300 / setup.config.training.online_batch_size
    assert metrics["monolith_trainer_ready"] == 1
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


def test_the_trainer_waits_out_a_nats_restart_and_a_dense_ps_restart(setup: Setup) -> None:
    trainer = setup.trainer()
    last = setup.stream.publish(samples(0, 100))
    wait_until(all_acked(setup, last), "the first samples acknowledged")
    # A trickle: each lone sample trains without waiting for a full batch (or a redelivery).
    for i in range(100, 105):
        last = setup.stream.publish(samples(i, 1))
        wait_until(all_acked(setup, last), f"lone sample {i} acknowledged", timeout=10)

    # NATS goes away and comes back on the same port and store: the consumer's place is kept.
    setup.restart_nats()
    last = setup.stream.publish(samples(105, 95))
    wait_until(all_acked(setup, last), "samples published after the NATS restart acknowledged")
    assert trainer.alive()

    # The dense-PS goes away: samples wait (in progress, not acked) and train once it is back.
    setup.dense.stop()
    last = setup.stream.publish(samples(200, 100))
    wait_until(lambda: trainer.metric("monolith_trainer_retries_total{dependency=ps}") >= 2, "retries counted")
    floor, _, _ = setup.stream.consumer("trainer")
    assert floor < last and trainer.alive()
    setup.dense.start()
    wait_until(all_acked(setup, last), "samples acknowledged once the dense-PS is back")

    assert trainer.metric("monolith_trainer_examples_total") >= 300
    log = trainer.log()
    assert log.count("ps unavailable") == 1, log[-3000:]  # one line per outage
    assert "ps reachable again" in log

    # SIGTERM while a step waits for the dense-PS: a clean exit that acknowledges nothing more,
    # and the next trainer trains those samples.
    setup.dense.stop()
    acked = last
    last = setup.stream.publish(samples(300, 20))
    retries = trainer.metric("monolith_trainer_retries_total{dependency=ps}")
    wait_until(lambda: trainer.metric("monolith_trainer_retries_total{dependency=ps}") > retries, "a retry")
    code, summary = trainer.stop()
    assert code == 0, trainer.log()[-3000:]
    assert summary["examples"] >= 300 and summary["last_sequence"] == acked
    assert setup.stream.consumer("trainer")[0] == acked
    assert "Traceback" not in trainer.log()
    setup.dense.start()
    setup.trainer("next")
    wait_until(all_acked(setup, last), "the handed-back samples trained by the next trainer")


def test_trainers_sharing_a_consumer_split_the_samples(setup: Setup) -> None:
    # Started while NATS is down: they wait for it instead of failing.
    setup.nats.stop()
    trainers = [setup.trainer(f"trainer-{i}", consumer="shared") for i in range(2)]
    wait_until(lambda: all("nats unavailable" in t.log() for t in trainers), "both trainers waiting for NATS")
    setup.restart_nats()
    wait_until(lambda: all(t.metric("monolith_trainer_ready") == 1 for t in trainers), "both trainers ready")
    last = 0
    for start in range(0, 400, 50):  # in chunks, while both are fetching
        last = setup.stream.publish(samples(start, 50))
    wait_until(all_acked(setup, last, "shared"), "every sample acknowledged")

    summaries = [t.stop()[1] for t in trainers]
    assert sum(s["examples"] for s in summaries) >= 400
    assert all(s["examples"] > 0 for s in summaries), summaries
