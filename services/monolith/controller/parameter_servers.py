"""What the controller checkpoints and restores: the training shards, the dense-PS, the stream position."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as eps_pb
from monolith.common.errors import MonolithError, Unavailable
from monolith.controller.settings import CHANNEL, RPC_TIMEOUT, STREAM_TIMEOUT
from monolith.dense_ps.client import DensePSClient
from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps.client import EmbeddingPSClient
from monolith.embedding_ps.routing import route_to_shards
from monolith.streams.pull_consumer import ConsumerAdmin, ConsumerState


def route(table: str, ids: np.ndarray, num_shards: int) -> np.ndarray:
    """The embedding-PS's routing of a table's ids to shards (a restore may reshard)."""
    return route_to_shards(ids, stable_hash64(table), num_shards)


class ParameterServers:
    """The training cluster's state, as the controller reads and rolls it back.

    Args:
        shards: "host:port" of every training embedding-PS shard, in shard order.
        dense: "host:port" of the dense-PS.
        consumer: the trainers' shared consumer on SAMPLES (None: no stream position is kept).

    Attributes:
        shards: one client per training shard, in shard order.
        dense: the dense-PS's client.
        consumer: the consumer's admin, or None.
    """

    def __init__(self, shards: Sequence[str], dense: str, consumer: ConsumerAdmin | None) -> None:
        if not shards:
            raise ValueError("at least one training shard address is required")
        self.shards = [
            EmbeddingPSClient(a, timeout=RPC_TIMEOUT, stream_timeout=STREAM_TIMEOUT, channel=CHANNEL,
                              name=f"training shard {i} ({a})")  # fmt: skip
            for i, a in enumerate(shards)
        ]
        self.dense = DensePSClient(dense, timeout=RPC_TIMEOUT, channel=CHANNEL)
        self.consumer = consumer

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def shard_addresses(self) -> list[str]:
        return [s.address for s in self.shards]

    def shard_stats(self) -> list[eps_pb.StatsResponse]:
        """Every training shard's Stats, in shard order.

        Raises:
            Unavailable: a shard did not answer (or answered with an error), naming it.
        """
        out = []
        for shard in self.shards:
            try:
                out.append(shard.stats())
            except MonolithError as exc:
                raise Unavailable(str(exc)) from None
        return out

    def position(self) -> ConsumerState | None:
        """The consumer's state now (None without a consumer, or before it exists)."""
        return self.consumer.position() if self.consumer is not None else None

    def drained_position(self, timeout: float) -> ConsumerState | None:
        """The consumer's state once nothing delivered is unacknowledged (call with the trainers paused).

        Raises:
            Unavailable: samples stayed delivered and unacknowledged for `timeout` seconds
                (a trainer died mid-step?).
        """
        if self.consumer is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            state = self.consumer.position()
            if state is None or state.ack_pending == 0:
                return state or ConsumerState(0, 0, 0, 0, 0)
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"{state.ack_pending} sample(s) delivered and not acknowledged with every trainer paused (a "
                    "trainer died mid-step?); no cut until they are"
                )
            time.sleep(0.02)

    def close(self) -> None:
        self.dense.close()
        for shard in self.shards:
            shard.close()
        if self.consumer is not None:
            self.consumer.close()
