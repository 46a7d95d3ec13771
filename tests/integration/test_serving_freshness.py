"""Training reaches the Predict API through the serving shards, within the sync interval.

The full serving path, in this process on free ports: 2 training embedding-PS shards, 2
serving shards each following its training shard with `ServingSync`, a dense-PS, and
model-serving reading only the serving shards. A plain TF Serving client watches one
user's scores while a trainer trains on that user.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from helpers.cluster import Cluster, start_cluster
from helpers.models import small_config
from helpers.waiting import wait_for
from monolith.common.server import MonolithServer, ServerConfig
from monolith.data.batch import Batch
from monolith.data.feature_ids import feature_id
from monolith.data.movielens import load_movielens, raw_feature_values
from monolith.dense_ps.client import DensePSClient
from monolith.dense_ps.service import build_dense_ps
from monolith.dense_ps.store import DenseStore
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.embedding_ps.sync import ServingSync
from monolith.model.config import ModelConfig
from monolith.serving.model import ServingModel
from monolith.serving.service import build_serving
from monolith.serving.servicer import SignatureConfig
from monolith.trainer.worker import TrainerWorker

SYNC_INTERVAL = 0.2
DEADLINE = 10.0  # seconds to wait for the syncs (50 intervals)


class Stack:
    """Training and serving shards, syncs, dense-PS, model-serving, a trainer, a TF client."""

    def __init__(self) -> None:
        self.config: ModelConfig = small_config()
        tables = self.config.tables()
        self.training: Cluster = start_cluster(num_shards=2, tables=tables)
        self.serving: Cluster = start_cluster(num_shards=2, role="serving", tables=tables)
        self.syncs = [
            ServingSync(shard, server.address, SYNC_INTERVAL)
            for shard, server in zip(self.serving.shards, self.training.servers)
        ]
        for sync in self.syncs:
            sync.start()
        self.dense_server: MonolithServer = build_dense_ps(
            DenseStore(self.config.model.optimizer), ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
        )
        self.dense_server.start()
        self.trainer = TrainerWorker(
            self.config,
            ShardedEmbeddingClient(self.training.addresses, self.config.table_dims()),
            DensePSClient(self.dense_server.address),
        )
        self.model = ServingModel(
            self.config,
            ShardedEmbeddingClient(self.serving.addresses, self.config.table_dims(), timeout=5),
            DensePSClient(self.dense_server.address),
        )
        self.model.refresh_dense()
        self.predict_server = build_serving(
            self.model, SignatureConfig(), ServerConfig(host="127.0.0.1", port=0, metrics_port=None)
        )
        self.predict_server.start()
        self.channel = grpc.insecure_channel(self.predict_server.address)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.predict_server.stop(grace=0)
        for sync in self.syncs:
            sync.stop()
        self.trainer.close()
        self.dense_server.stop(grace=0)
        self.serving.stop()
        self.training.stop()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    stack = Stack()
    yield stack
    stack.stop()


def _user_request(user: dict, movies: list[dict]) -> predict_pb2.PredictRequest:
    """One user (sent once, broadcast) against several movies, as plain TF tensors."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "monolith"
    for name in ("user_id", "age", "gender", "occupation", "zip"):
        request.inputs[name].CopyFrom(tf.make_tensor_proto([str(user[name])]))
    request.inputs["movie_id"].CopyFrom(tf.make_tensor_proto([m["movie_id"] for m in movies], dtype=tf.int64))
    width = max(len(m["genres"]) for m in movies)
    genres = [m["genres"] + [""] * (width - len(m["genres"])) for m in movies]
    request.inputs["genres"].CopyFrom(tf.make_tensor_proto(genres))
    return request


def _scores(stack: Stack, request: predict_pb2.PredictRequest) -> np.ndarray:
    return tf.make_ndarray(stack.stub.Predict(request, timeout=10).outputs["scores"])


def _positives_of(data: Batch, user_id: int, count: int) -> Batch:
    """`count` copies of the user's first example, all labelled positive."""
    first = int(np.flatnonzero(data.ids["user_id"] == feature_id("user_id", user_id))[0])
    one = data.slice(first, first + 1)
    batch = Batch.concat([one] * count)
    return Batch(batch.ids, batch.row_splits, np.ones(count, np.float32), batch.timestamps)


def _wait_synced(stack: Stack) -> None:
    """Until every serving shard has acknowledged its training shard's current version."""
    targets = [(shard.incarnation, shard.version) for shard in stack.training.shards]

    def synced() -> bool:
        for sync, (incarnation, version) in zip(stack.syncs, targets):
            acknowledged = sync.acknowledged
            if acknowledged is None or acknowledged[0] != incarnation or acknowledged[1] < version:
                return False
        return True

    wait_for(synced, "serving shards acknowledge the training shards' versions", timeout=DEADLINE, interval=0.02)


def _wait_for_change(stack: Stack, request: predict_pb2.PredictRequest, before: np.ndarray) -> float:
    """Seconds until the served scores differ from `before`."""
    start = time.monotonic()
    wait_for(lambda: not np.allclose(_scores(stack, request), before, atol=1e-6), "served scores to change",
             timeout=DEADLINE, interval=0.02)  # fmt: skip
    return time.monotonic() - start


def test_training_on_a_user_reaches_served_scores_within_the_sync_interval(stack: Stack) -> None:
    data = load_movielens(limit=3000)
    for batch in data.batches(256):
        stack.trainer.train(batch)
    raw = raw_feature_values()
    user = next(u for u in raw["users"] if feature_id("user_id", u["user_id"]) == data.ids["user_id"][0])
    request = _user_request(user, raw["movies"][:5])
    stack.model.refresh_dense()
    # Wait until the serving shards hold what was trained so far, so the change measured
    # below is the trainer's next step only.
    _wait_synced(stack)
    before = _scores(stack, request)

    for _ in range(3):
        stack.trainer.train(_positives_of(data, user["user_id"], 32))
    lag = _wait_for_change(stack, request, before)
    after = _scores(stack, request)

    # Sparse rows reach serving within a sync interval (plus one sync's work); dense
    # parameters are not refreshed here, so the change is the user's rows alone.
    assert lag < 5 * SYNC_INTERVAL + 1.0, lag
    assert np.all(after > before), (before, after)


def test_serving_keeps_answering_while_the_training_shards_are_down(stack: Stack) -> None:
    raw = raw_feature_values()
    request = _user_request(raw["users"][1], raw["movies"][5:10])
    before = _scores(stack, request)
    for server in stack.training.servers:
        server.stop(grace=0)
    # Every sync thread has met the outage: its latest attempt failed (those before the
    # stop succeeded).
    wait_for(
        lambda: all(s.last_result is not None and not s.last_result.ok for s in stack.syncs),
        "a failed sync attempt on every serving shard",
        timeout=DEADLINE,
        interval=0.02,
    )

    after = _scores(stack, request)

    np.testing.assert_allclose(after, before, atol=1e-6)
    assert any(not sync.sync_once().ok for sync in stack.syncs)
