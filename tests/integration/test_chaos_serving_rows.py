"""The chaos harness's serving-rows watch against a real embedding-PS shard: the ratio is always
measured (a shard that does not answer the first poll is asked again), and it is the fewest rows
the shard held over its rows at the start."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from helpers.waiting import wait_for
from monolith.common.process import free_port
from monolith.common.server import MonolithServer, ServerConfig
from monolith.embedding.config import TableConfig
from monolith.embedding.table import RowBatch
from monolith.embedding_ps.service import build_embedding_ps
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig
from monolith.harness.chaos import ChaosError, ServingRows

TABLE = TableConfig(name="user", dim=4)


def shard_with_rows(count: int) -> EmbeddingShard:
    shard = EmbeddingShard(ShardConfig(shard=0, num_shards=1, role="training", tables=(TABLE,)))
    shard.lookup([("user", np.arange(count, dtype=np.int64), None)], True, 1000.0)
    return shard


def serve(shard: EmbeddingShard, port: int = 0) -> MonolithServer:
    server = build_embedding_ps(shard, ServerConfig(host="127.0.0.1", port=port, metrics_port=None))
    server.start()
    return server


class RecordedPolls(ServingRows):
    """ServingRows that keeps every poll's answer."""

    def __init__(self, addresses: list[str], interval: float) -> None:
        super().__init__(addresses, interval)
        self.polls: list[list[int | None]] = []

    def rows(self) -> list[int | None]:
        self.polls.append(super().rows())
        return self.polls[-1]


@pytest.fixture
def servers() -> Iterator[list[MonolithServer]]:
    started: list[MonolithServer] = []
    yield started
    for server in started:
        server.stop(grace=0)


def test_a_shard_that_misses_the_first_poll_is_asked_again(servers: list[MonolithServer]) -> None:
    port = free_port()
    watch = RecordedPolls([f"127.0.0.1:{port}"], interval=0.05)
    starting = threading.Thread(target=watch.start)
    starting.start()
    wait_for(lambda: watch.polls, "the first poll")
    assert watch.polls[0] == [None]  # nothing listens yet

    servers.append(serve(shard_with_rows(10), port))
    starting.join(30)

    assert not starting.is_alive() and watch.before == [10]
    assert watch.stop() == 1.0


def test_the_ratio_is_the_fewest_rows_over_the_rows_at_the_start(servers: list[MonolithServer]) -> None:
    shard = shard_with_rows(10)
    servers.append(serve(shard))
    watch = ServingRows([servers[0].address], interval=0.05).start()
    assert watch.before == [10]

    empty = RowBatch(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.uint32))
    shard.import_chunk("user", empty, np.arange(5, dtype=np.int64))  # half the rows deleted
    wait_for(lambda: watch.fewest == [5], "a poll to see the deletion")
    shard.lookup([("user", np.arange(5, dtype=np.int64), None)], True, 1001.0)  # and back

    assert watch.stop() == 0.5


def test_a_shard_that_never_answers_is_an_error_not_an_unknown_ratio() -> None:
    with pytest.raises(ChaosError, match=r"serving shard\(s\) 127.0.0.1:\d+ did not answer Stats within 0.3 s"):
        ServingRows([f"127.0.0.1:{free_port()}"]).start(timeout=0.3)
