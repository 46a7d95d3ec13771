"""Online training against a real nats-server: the parts the online-trainer and checkpoint tests share.

`OnlineStack` is a nats-server, embedding-PS shards and a dense-PS in this process, the
test's own NATS connection (`Stream`), and the `monolith trainer --mode online` processes
(`Trainer`) a test starts; `samples` builds the joined samples they train on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

import yaml

from helpers.cluster import Cluster, start_cluster
from helpers.metrics import metrics_url, poll_metrics
from helpers.models import small_raw_config
from helpers.processes import Role
from helpers.streams import publish
from monolith.api.joiner.v1 import joiner_pb2
from monolith.checkpoint.store import CheckpointStore
from monolith.common.errors import Unavailable
from monolith.common.process import free_port
from monolith.common.scrape import Scrape
from monolith.common.server import MonolithServer, ServerConfig
from monolith.controller.controller import CheckpointController
from monolith.controller.settings import ControllerSettings
from monolith.dense_ps.service import build_dense_ps
from monolith.dense_ps.store import DenseStore
from monolith.embedding_ps.service import build_embedding_ps
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig
from monolith.model.config import ModelConfig, model_config_from_dict
from monolith.streams.config import SAMPLES_STREAM, StreamsConfig, partition_of, samples_subject
from monolith.streams.jetstream import TRANSIENT_ERRORS
from monolith.streams.nats_server import NatsServer
from monolith.streams.publish import Message
from monolith.streams.pull_consumer import ConsumerAdmin, ConsumerSettings
from monolith.streams.watch import StreamWatch

PARTITIONS = 4
START = 880_000_000  # event times from MovieLens' months (1997-1998)
DEADLINE = 90.0  # seconds to wait for the trainers; a trainer's start (TensorFlow import) is most of it


def small_model(directory: Path) -> tuple[ModelConfig, str]:
    """The MovieLens model with one small hidden layer, and its YAML (written in `directory`) for the trainers."""
    raw = small_raw_config()
    path = directory / "model.yaml"
    path.write_text(yaml.safe_dump(raw))
    return model_config_from_dict(raw), str(path)


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


class Stream:
    """The test's own view of NATS: publishes samples and reads the trainers' consumer.

    Publishing is `helpers.streams.publish`; the questions (how far the stream goes, where a
    consumer is) go through one `StreamWatch`, connected on first use, that reconnects
    across a NATS restart.
    """

    def __init__(self, url: str) -> None:
        self.config = StreamsConfig(url=url, partitions=PARTITIONS)
        self._watch = StreamWatch(self.config, "test")

    def publish(self, payloads: list[tuple[str, bytes]]) -> int:
        """Publishes (request_id, payload) pairs on their partitions; returns the stream's last sequence.

        The test is the only publisher on SAMPLES, so that is the sequence of its last sample.
        """
        messages = [Message(samples_subject(partition_of(request_id, PARTITIONS)), payload, f"smp/{request_id}")
                    for request_id, payload in payloads]  # fmt: skip
        publish(self.config, messages, SAMPLES_STREAM)
        return self._watch.stream_state(SAMPLES_STREAM).last_sequence

    def consumer(self, name: str) -> tuple[int, int, int]:
        """(ack floor stream sequence, pending, ack pending) of a durable consumer; zeros before it exists."""
        try:
            state = self._watch.consumer_state(SAMPLES_STREAM, name)
        except (TimeoutError, Unavailable, *TRANSIENT_ERRORS):  # NATS restarting: ask again
            return 0, 0, 0
        return (0, 0, 0) if state is None else (state.ack_floor, state.pending, state.ack_pending)

    def all_acked(self, last: int, consumer: str = "trainer") -> bool:
        """Whether `consumer` has acknowledged every sample up to stream sequence `last`, and holds none."""
        floor, pending, ack_pending = self.consumer(consumer)
        return floor >= last and pending == 0 and ack_pending == 0

    def close(self) -> None:
        self._watch.close()


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
    """`monolith trainer --mode online` as a process, with its /metrics (and its TrainerControl port, if asked)."""

    def __init__(self, logs: Path, name: str, config_path: str, shards: list[str], dense: str, nats: str,
                 consumer: str = "trainer", control: bool = False) -> None:  # fmt: skip
        self.metrics_port = free_port()
        self.control_port = free_port() if control else None
        args = ["trainer", "--mode", "online", "--config", config_path, "--embedding-ps", ",".join(shards),
                "--dense-ps", dense, "--nats", nats, "--partitions", str(PARTITIONS), "--consumer", consumer,
                "--host", "127.0.0.1", "--metrics-port", str(self.metrics_port)]  # fmt: skip
        if self.control_port is not None:
            args += ["--control-port", str(self.control_port)]
        self.role = Role(logs, name, args)

    @property
    def control(self) -> str:
        """Its TrainerControl address."""
        assert self.control_port is not None, "started without control=True"
        return f"127.0.0.1:{self.control_port}"

    def log(self) -> str:
        return self.role.log()

    def metrics(self) -> Scrape:
        """Its /metrics page (empty while it does not answer: every sum 0)."""
        return poll_metrics(metrics_url(self.metrics_port))

    def metric(self, name: str, **labels: str) -> float:
        """The sum of one metric's series with those labels (0 while it does not answer)."""
        return self.metrics().sum(name, **labels)

    def alive(self) -> bool:
        return self.role.alive()

    def stop(self, timeout: float = 30.0) -> tuple[int, dict]:
        """SIGTERM (then SIGKILL after `timeout`); returns (exit code, the JSON summary it printed last)."""
        code = self.role.stop(timeout)
        lines = [line for line in self.log().splitlines() if line.startswith("{")]
        return code, (json.loads(lines[-1]) if lines else {})

    def kill(self) -> int:
        """SIGKILL at once (kill -9); the exit code."""
        return self.role.kill()


class Shards(Protocol):
    """Embedding-PS shards a test started (conftest's `start_cluster`)."""

    @property
    def addresses(self) -> list[str]: ...

    def stop(self) -> None: ...


class OnlineStack:
    """A nats-server, the test's embedding-PS shards, a dense-PS and a NATS connection; the trainers it starts.

    Args:
        tmp: the test's directory (NATS' store, the logs).
        model: the model and its YAML path (`small_model`).
        shards: the embedding-PS shards, stopped with the rest by `close`.
    """

    def __init__(self, tmp: Path, model: tuple[ModelConfig, str], shards: Shards) -> None:
        self.tmp = tmp
        self.config, self.config_path = model
        self.nats = NatsServer(str(tmp / "nats"), log_path=str(tmp / "nats.log")).start()
        self.cluster = shards
        self.dense = DensePS(self.config)
        self.stream = Stream(self.nats.url)
        self.trainers: list[Trainer] = []

    def trainer(self, name: str = "trainer", consumer: str = "trainer", control: bool = False) -> Trainer:
        """Starts an online trainer (its log `<name>.log` in the test's directory)."""
        trainer = Trainer(self.tmp, name, self.config_path, self.cluster.addresses, self.dense.address,
                          self.nats.url, consumer, control)  # fmt: skip
        self.trainers.append(trainer)
        return trainer

    def all_acked(self, last: int, consumer: str = "trainer") -> bool:
        """Whether the trainers' consumer has acknowledged every sample up to `last`, and holds none."""
        return self.stream.all_acked(last, consumer)

    def restart_nats(self) -> None:
        """Stops NATS (if it runs) and starts it again on the same port and store."""
        down = self.nats
        down.stop()
        self.nats = NatsServer(down.data_dir, down.port, down.monitor_port, down.log_path).start()

    def close(self) -> None:
        for trainer in self.trainers:
            trainer.role.stop(timeout=5)
        self.stream.close()
        self.nats.stop()
        self.dense.stop()
        self.cluster.stop()
        shutil.rmtree(self.tmp / "nats", ignore_errors=True)


class ControlledStack(OnlineStack):
    """`OnlineStack` with two in-process training shards, a checkpoint store and a controller of trainers with a TrainerControl port."""

    cluster: Cluster

    def __init__(self, tmp: Path, model: tuple[ModelConfig, str]) -> None:
        super().__init__(tmp, model, start_cluster(num_shards=2, tables=model[0].tables()))
        self.store = CheckpointStore(str(tmp / "checkpoints"))

    def controller(self, *trainers: Trainer) -> CheckpointController:
        """A controller of the shards, the dense-PS, the trainers and their consumer (the caller closes it)."""
        admin = ConsumerAdmin(self.stream.config, ConsumerSettings(SAMPLES_STREAM, "samples.>", "trainer"))
        return CheckpointController(self.store, self.cluster.addresses, self.dense.address,
                                    [t.control for t in trainers], admin, ControllerSettings(full_every=5))  # fmt: skip

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
