"""Real embedding-PS servers on free ports, for the integration tests.

`ps_cluster` is two training shards shared by one test module (tests that mutate it use
their own id ranges); `make_cluster` starts fresh ones a test owns; `serving_shard` is a
single read-only shard.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.api.embedding_ps.v1 import embedding_ps_pb2_grpc as pb_grpc
from monolith.common.server import MonolithServer, ServerConfig
from monolith.common.wire import decode_array
from monolith.embedding.config import AdmissionConfig, OptimizerConfig, TableConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps.routing import route_to_shards
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.embedding_ps.service import build_embedding_ps
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig

TABLES = (
    TableConfig(name="user", dim=8, admission=AdmissionConfig(filter="counting", threshold=2)),
    TableConfig(name="item", dim=8, optimizer=OptimizerConfig(kind="adagrad")),
    TableConfig(name="tag", dim=4, optimizer=OptimizerConfig(kind="sgd", learning_rate=0.5), expire_after=100.0),
)

# A row as exported: (values including optimizer state, update time).
Row = tuple[tuple[float, ...], int]


@dataclasses.dataclass
class Cluster:
    """Started shards, a sharded client, and raw stubs (one per shard).

    The raw channels accept messages of any size, so the server's own limits are the
    ones a test meets.
    """

    servers: list[MonolithServer]
    shards: list[EmbeddingShard]
    client: ShardedEmbeddingClient
    channels: list[grpc.Channel]
    stubs: list[pb_grpc.EmbeddingPSStub]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def owners(self, name: str, ids: np.ndarray) -> np.ndarray:
        """The shard each id of a table routes to."""
        return route_to_shards(np.asarray(ids, np.int64), stable_hash64(name), len(self.shards))

    def ids_on(self, name: str, shard: int, count: int, start: int) -> np.ndarray:
        """The first `count` ids >= start of a table that route to `shard`."""
        candidates = np.arange(start, start + 64 * count + 64, dtype=np.int64)
        found = candidates[self.owners(name, candidates) == shard][:count]
        assert found.shape[0] == count
        return found

    def rows(self, shard: int, include_state: bool = True) -> dict[str, dict[int, Row]]:
        """A full export of one shard: table -> id -> row."""
        request = pb.ExportRequest(include_optimizer_state=include_state, max_rows_per_chunk=4096)
        return decode_export(self.stubs[shard].Export(request, timeout=10))

    def snapshot(self) -> tuple[list[pb.StatsResponse], list[dict[str, dict[int, Row]]]]:
        """Every shard's stats and full table contents, to compare before and after a call."""
        return self.client.stats(), [self.rows(i) for i in range(len(self.shards))]

    def stop(self) -> None:
        self.client.close()
        for channel in self.channels:
            channel.close()
        # In parallel: closing a /metrics endpoint waits out its 0.5 s poll.
        stoppers = [threading.Thread(target=s.stop, kwargs={"grace": 0}) for s in self.servers]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()


def decode_export(chunks: Iterator[pb.RowChunk]) -> dict[str, dict[int, Row]]:
    """Rows of exported chunks as table -> id -> row (deleted ids are dropped)."""
    out: dict[str, dict[int, Row]] = {}
    for c in chunks:
        ids = decode_array(c.ids, "<i8", (c.num_rows,), "ids")
        values = decode_array(c.values, "<f4", (c.num_rows, c.width), "values")
        times = decode_array(c.update_times, "<u4", (c.num_rows,), "update_times")
        rows = out.setdefault(c.table, {})
        for i, id_ in enumerate(ids.tolist()):
            assert id_ not in rows, f"id {id_} of table {c.table!r} exported twice"
            rows[id_] = (tuple(values[i].tolist()), int(times[i]))
    return out


def start_cluster(
    num_shards: int = 2,
    role: str = "training",
    tables: tuple[TableConfig, ...] = TABLES,
    max_ids_per_request: int = 1_000_000,
    max_message_bytes: int = 64 * 1024 * 1024,
    metrics: bool = False,
) -> Cluster:
    """Starts `num_shards` shards on free ports in this process (/metrics only if asked)."""
    shards = [
        EmbeddingShard(ShardConfig(shard=i, num_shards=num_shards, role=role, tables=tables, max_ids_per_request=max_ids_per_request,
                                   max_message_bytes=max_message_bytes))
        for i in range(num_shards)
    ]
    config = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=0 if metrics else None, max_message_bytes=max_message_bytes
    )
    servers = [build_embedding_ps(shard, config) for shard in shards]
    for server in servers:
        server.start()
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channels = [grpc.insecure_channel(s.address, options=unlimited) for s in servers]
    client = ShardedEmbeddingClient([s.address for s in servers], {s.name: s.dim for s in tables}, timeout=10)
    return Cluster(servers, shards, client, channels, [pb_grpc.EmbeddingPSStub(c) for c in channels])


@pytest.fixture(scope="module")
def ps_cluster() -> Iterator[Cluster]:
    """Two training shards shared by a module; tests that mutate use distinct ids."""
    cluster = start_cluster(metrics=True)
    yield cluster
    cluster.stop()


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., Cluster]]:
    """Starts fresh clusters (see `start_cluster`) that the test owns; stops them after."""
    started: list[Cluster] = []

    def make(**kwargs: object) -> Cluster:
        started.append(start_cluster(**kwargs))  # type: ignore[arg-type]
        return started[-1]

    yield make
    for cluster in started:
        cluster.stop()


@pytest.fixture
def serving_shard(make_cluster: Callable[..., Cluster]) -> Cluster:
    """One read-only serving shard (shard 0 of 1), empty until something is imported."""
    return make_cluster(num_shards=1, role="serving")
