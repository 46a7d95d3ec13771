"""One clock: batch training on 1997 data, then online training from samples (some without a
time) with `expire_after` set, against real embedding-PS shards: expiry sweeps keep every
batch-trained row, and no table's clock ever reads today.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from helpers.cluster import Cluster, start_cluster
from helpers.models import small_raw_config
from monolith.api.joiner.v1 import joiner_pb2
from monolith.data.batch import Batch
from monolith.data.movielens import load_movielens
from monolith.model.config import ModelConfig, model_config_from_dict
from monolith.trainer.backends import LocalDense
from monolith.trainer.service import sample_decoder
from monolith.trainer.worker import TrainerWorker

BATCH_EXAMPLES = 2000  # about 4 days of MovieLens time, late 1997
EXPIRE_AFTER = 10 * 86_400  # longer than that span, far shorter than the years since


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    raw = small_raw_config()
    for feature in raw["features"]:
        feature["expire_after"] = EXPIRE_AFTER
    return model_config_from_dict(raw)


@pytest.fixture
def cluster(config: ModelConfig) -> Iterator[Cluster]:
    cluster = start_cluster(num_shards=2, tables=config.tables())
    yield cluster
    cluster.stop()


def live_rows(cluster: Cluster) -> dict[str, set[int]]:
    """Every table's ids over the shards."""
    out: dict[str, set[int]] = {}
    for shard in cluster.shards:
        for name, table in shard.tables.items():
            out.setdefault(name, set()).update(int(i) for b in table.export(0, False, 1 << 20) for i in b.ids)
    return out


def clocks(cluster: Cluster) -> set[int]:
    return {t.newest_update_time for stats in cluster.client.stats() for t in stats.tables} - {0}


def online_samples(data: Batch, start: int, stop: int, first_time: float, untimed_every: int) -> list[bytes]:
    """Samples of MovieLens users x movies as the joiner writes them: values as text, event
    times one second apart from `first_time`, every `untimed_every`-th without a time (0)."""
    out = []
    for i in range(start, stop):
        sample = joiner_pb2.Sample(request_id=f"r{i}", item_id=str(i % 50), label=float(i % 4 == 0), sample_rate=1.0,
                                   event_time=0.0 if i % untimed_every == 0 else first_time + (i - start))  # fmt: skip
        values = {"user_id": [str(i % 90)], "movie_id": [str(i % 50)], "age": ["25-34"], "gender": ["MF"[i % 2]],
                  "occupation": ["writer"], "zip": ["554"], "genres": ["Drama"]}  # fmt: skip
        for name, texts in values.items():
            sample.features[name].values.extend(texts)
        out.append(sample.SerializeToString())
    return out


def test_batch_trained_rows_survive_online_training_and_expiry_sweeps(config: ModelConfig, cluster: Cluster) -> None:
    worker = TrainerWorker(config, cluster.client, LocalDense(config.model.optimizer))
    data = load_movielens(limit=BATCH_EXAMPLES)
    for batch in data.batches(config.training.batch_size):
        worker.train(batch)
    batch_rows = live_rows(cluster)
    batch_end = int(data.timestamps.max())
    assert clocks(cluster) <= set(range(int(data.timestamps.min()), batch_end + 1))
    assert max(clocks(cluster)) == batch_end
    for shard in cluster.shards:
        assert not any(shard.expire().values())

    # Online: samples right after the batch data, a fifth of them without a time; a sweep after
    # every step, as the embedding-PS's sweeper would run while training goes on.
    decoder = sample_decoder(config)
    payloads = online_samples(data, 0, 400, batch_end + 1, untimed_every=5)
    evicted = 0
    for start in range(0, len(payloads), config.training.online_batch_size):
        decoded = decoder.decode(payloads[start : start + config.training.online_batch_size])
        assert not decoded.rejected
        worker.train(decoded.batch)
        evicted += sum(sum(shard.expire().values()) for shard in cluster.shards)
    # And a batch with no time at all: it stamps the tables' clocks and moves none.
    untimed = decoder.decode(online_samples(data, 400, 408, 0.0, untimed_every=1)).batch
    assert not untimed.timestamps.any()
    worker.train(untimed)
    evicted += sum(sum(shard.expire().values()) for shard in cluster.shards)

    assert evicted == 0
    after = live_rows(cluster)
    for name, ids in batch_rows.items():
        assert ids <= after[name], f"{name}: {len(ids - after[name])} batch-trained rows expired"
    newest = batch_end + 400  # sample 399, one second apart from batch_end + 1
    assert max(clocks(cluster)) == newest  # the newest event time, not today
    assert newest < time.time() - 365 * 86_400
    # Rows the online steps touched carry event times too.
    user_times = np.concatenate([b.update_times for s in cluster.shards
                                 for b in s.tables["user_id"].export(0, False, 1 << 20)])  # fmt: skip
    assert user_times.max() == newest
