"""The per-shard embedding-PS client against real shards: decoded export, restore, stats, errors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from helpers.cluster import Cluster
from monolith.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from monolith.common.process import free_port
from monolith.embedding.table import RowBatch
from monolith.embedding_ps.client import EmbeddingPSClient


def _populate(cluster: Cluster) -> None:
    """Rows in every table on every shard, trained a little (so optimizer state is not initial)."""
    ids = {name: np.arange(1, 41, dtype=np.int64) for name in ("user", "item", "tag")}
    cluster.client.lookup({n: np.repeat(v, 2) if n == "user" else v for n, v in ids.items()}, training=True,
                          update_time=1_700_000_000)  # fmt: skip
    cluster.client.apply_gradients(
        {n: (v[::2], np.full((20, 4 if n == "tag" else 8), 0.5, np.float32)) for n, v in ids.items()},
        update_time=1_700_000_100,
    )


def test_export_with_optimizer_state_restores_into_another_shard(make_cluster: Callable[..., Cluster]) -> None:
    source, target = make_cluster(), make_cluster()
    _populate(source)

    for index, shard in enumerate(source.shards):
        with EmbeddingPSClient(source.addresses[index], timeout=10) as client:
            chunks = list(client.export(include_optimizer_state=True, max_rows_per_chunk=7))
        assert chunks and all(c.includes_optimizer_state for c in chunks)
        assert {(c.version, c.incarnation) for c in chunks} == {(shard.version, shard.incarnation)}
        assert max(c.num_rows for c in chunks) <= 7
        assert all(c.newest_update_time == (c.rows.update_times.max() if c.num_rows else 0) for c in chunks)
        before = target.shards[index].incarnation

        response = target.client.shard(index).restore((c.table, c.rows) for c in chunks)

        assert response.rows == sum(c.num_rows for c in chunks)
        assert response.incarnation == target.shards[index].incarnation != before
    assert [target.rows(i) for i in (0, 1)] == [source.rows(i) for i in (0, 1)]


def test_stats_and_an_empty_restore(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(num_shards=1)
    _populate(cluster)
    client = cluster.client.shard(0)

    stats = client.stats()
    assert (stats.shard, stats.num_shards, stats.role) == (0, 1, "training")
    assert (stats.version, stats.incarnation) == (cluster.shards[0].version, cluster.shards[0].incarnation)

    assert client.restore([]).rows == 0  # no chunks: an empty shard
    assert list(client.export()) == []


def test_errors_keep_the_shards_status_and_name_it(
    make_cluster: Callable[..., Cluster], serving_shard: Cluster
) -> None:
    training = make_cluster(num_shards=1)
    rows = RowBatch(np.arange(3, dtype=np.int64), np.ones((3, 8), np.float32), np.zeros(3, np.uint32))

    with pytest.raises(FailedPrecondition, match="embedding-PS shard 0 .* Restore: .*changes only by sync"):
        serving_shard.client.shard(0).restore([("item", rows)])
    with pytest.raises(InvalidArgument, match="Restore: .*unknown table 'nope'"):
        training.client.shard(0).restore([("nope", rows)])
    with pytest.raises(InvalidArgument, match="embedding-PS shard 0 .* Export: .*unknown table 'nope'"):
        list(training.client.shard(0).export(tables=["nope"]))
    with EmbeddingPSClient(f"127.0.0.1:{free_port()}", timeout=2, name="shard nowhere") as nowhere:
        with pytest.raises(Unavailable, match="shard nowhere Stats: UNAVAILABLE"):
            nowhere.stats()
        with pytest.raises(Unavailable, match="shard nowhere Export"):
            list(nowhere.export())


def test_closing_an_export_early_cancels_it(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(num_shards=1)
    _populate(cluster)
    chunks = cluster.client.shard(0).export(max_rows_per_chunk=1)

    first = next(chunks)
    chunks.close()

    assert first.num_rows == 1
    assert cluster.client.shard(0).stats().version == cluster.shards[0].version  # the channel still serves
