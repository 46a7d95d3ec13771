"""Real embedding-PS shards on free ports in the test's process, with a sharded client and raw stubs.

tests/integration/conftest.py makes fixtures of them (`ps_cluster`, `make_cluster`,
`serving_shard`); tests that need a cluster of their own call `start_cluster`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable

import grpc
import numpy as np

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.api.embedding_ps.v1 import embedding_ps_pb2_grpc as pb_grpc
from monolith.common.channel import UNLIMITED, ChannelConfig, open_channel
from monolith.common.server import MonolithServer, ServerConfig
from monolith.embedding.config import AdmissionConfig, OptimizerConfig, TableConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps.routing import route_to_shards
from monolith.embedding_ps.chunks import Chunk, decode_chunk
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.embedding_ps.service import build_embedding_ps
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig

TABLES = (
    TableConfig(name="user", dim=8, admission=AdmissionConfig(filter="counting", threshold=2)),
    TableConfig(name="item", dim=8, optimizer=OptimizerConfig(kind="adagrad")),
    TableConfig(name="tag", dim=4, optimizer=OptimizerConfig(kind="sgd", learning_rate=0.5), expire_after=100.0),
)

# The raw stubs' channels: no client-side limits, so the servers' own are the ones a test meets.
RAW = ChannelConfig(max_send_bytes=UNLIMITED, max_receive_bytes=UNLIMITED, keepalive_seconds=None)

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


def decode_export(messages: Iterable[pb.RowChunk]) -> dict[str, dict[int, Row]]:
    """Rows of exported chunk messages (a raw stub's Export) as table -> id -> row."""
    return exported_rows(decode_chunk(m, f"export chunk {i}") for i, m in enumerate(messages))


def exported_rows(chunks: Iterable[Chunk]) -> dict[str, dict[int, Row]]:
    """Rows of exported chunks (an EmbeddingPSClient's export) as table -> id -> row (deleted ids are dropped)."""
    out: dict[str, dict[int, Row]] = {}
    for chunk in chunks:
        rows = out.setdefault(chunk.table, {})
        for i, id_ in enumerate(chunk.rows.ids.tolist()):
            assert id_ not in rows, f"id {id_} of table {chunk.table!r} exported twice"
            rows[id_] = (tuple(chunk.rows.values[i].tolist()), int(chunk.rows.update_times[i]))
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
    channels = [open_channel(s.address, RAW) for s in servers]
    client = ShardedEmbeddingClient([s.address for s in servers], {s.name: s.dim for s in tables}, timeout=10)
    return Cluster(servers, shards, client, channels, [pb_grpc.EmbeddingPSStub(c) for c in channels])
