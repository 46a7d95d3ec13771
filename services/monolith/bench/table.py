"""`monolith bench table`: the collisionless table in process and the embedding-PS over gRPC.

Figures (speeds are ratios to a baseline measured in the same run, interleaved in
rounds so machine noise hits both sides alike; each figure is the median over rounds):
- lookup_ids_per_s vs dict_lookup_ids_per_s: existing ids → embeddings in the table, vs
  a Python dict mapping the same ids to row indices;
- insert_ids_per_s: new ids admitted and initialized;
- grpc_lookup_ids_per_s vs grpc_echo_ids_per_s: 2 shard processes on loopback through
  the sharded client, 4096 ids per call, dim 16, vs the same calls to 2 bare gRPC echo
  processes moving the same bytes;
- bytes_per_row (measured) vs payload_bytes_per_row (key + embedding + optimizer state).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent import futures
from typing import Callable

import grpc
import numpy as np
import yaml

from monolith.bench import echo
from monolith.common.process import RoleProcess, free_port, start_role, wait_healthy
from monolith.embedding.config import SlotConfig
from monolith.embedding.table import EmbeddingTable
from monolith.embedding_ps.client import ShardedEmbeddingClient

DIM = 16
BATCH = 4096
ROUNDS = 5


def _rate(fn: Callable[[], int], min_seconds: float) -> float:
    """Calls fn (which returns ids handled) until min_seconds pass; returns ids per second."""
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def _progress(message: str) -> None:
    print(f"[bench table] {message}", file=sys.stderr, flush=True)


def _in_process(rows: int, seconds: float) -> dict[str, float]:
    rng = np.random.default_rng(0)
    ids = rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
    table = EmbeddingTable(SlotConfig(name="bench", dim=DIM))
    _progress(f"inserting {rows} ids")
    start = time.perf_counter()
    for i in range(0, rows, BATCH):
        table.lookup_train(ids[i : i + BATCH], None, 1.0, 1)
    insert_rate = rows / (time.perf_counter() - start)
    stats = table.stats()
    as_dict = {int(k): i for i, k in enumerate(ids.tolist())}
    batches = [ids[rng.integers(0, rows, BATCH)] for _ in range(64)]
    cursor = iter(range(1 << 62))

    def table_lookup() -> int:
        table.lookup(batches[next(cursor) % len(batches)])
        return BATCH

    def dict_lookup() -> int:
        batch = batches[next(cursor) % len(batches)]
        [as_dict[k] for k in batch.tolist()]  # the dict baseline: ids → row indices
        return BATCH

    table_lookup()
    _progress("lookups: table vs dict")
    lookups, dict_lookups = [], []
    for _ in range(ROUNDS):
        lookups.append(_rate(table_lookup, seconds))
        dict_lookups.append(_rate(dict_lookup, seconds))
    payload = 8 + 4 * table.width
    return {
        "rows": rows,
        "insert_ids_per_s": insert_rate,
        "lookup_ids_per_s": statistics.median(lookups),
        "dict_lookup_ids_per_s": statistics.median(dict_lookups),
        "bytes_per_row": stats.bytes / stats.rows,
        "payload_bytes_per_row": payload,
    }


def _over_grpc(rows: int, seconds: float, workdir: str) -> dict[str, float]:
    config = os.path.join(workdir, "slots.yaml")
    with open(config, "w", encoding="utf-8") as f:
        yaml.safe_dump({"slots": [{"name": "bench", "dim": DIM}]}, f)
    procs: list[RoleProcess] = []
    try:
        ps_addresses, echo_addresses = [], []
        for shard in range(2):
            proc, address = start_role(
                ["embedding-ps", "--shard", str(shard), "--num-shards", "2", "--config", config],
                os.path.join(workdir, f"ps{shard}.log"),
            )
            procs.append(proc)
            ps_addresses.append(address)
            port = free_port()
            procs.append(RoleProcess(["--port", str(port)], os.path.join(workdir, f"echo{shard}.log"), echo.__name__))
            echo_addresses.append(f"127.0.0.1:{port}")
        for address in ps_addresses:
            wait_healthy(address)
        client = ShardedEmbeddingClient(ps_addresses, {"bench": DIM})
        rng = np.random.default_rng(1)
        ids = rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
        _progress(f"loading {rows} ids into 2 shards")
        for i in range(0, rows, BATCH):
            client.lookup({"bench": ids[i : i + BATCH]}, training=True)
        batches = [ids[rng.integers(0, rows, BATCH)] for _ in range(64)]
        # The echo calls move what a lookup moves: each shard's share of the ids out,
        # its embeddings back.
        shares = [len(batches[0]) // 2, len(batches[0]) - len(batches[0]) // 2]
        channels = [grpc.insecure_channel(a) for a in echo_addresses]
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=60)
        echo_stubs = [echo.stub(c) for c in channels]
        requests = [(n * DIM * 4).to_bytes(8, "little") + bytes(n * 8 - 8) for n in shares]
        cursor = iter(range(1 << 62))

        def grpc_lookup() -> int:
            client.lookup({"bench": batches[next(cursor) % len(batches)]})
            return BATCH

        # The same fan-out as the sharded client: blocking calls on a two-thread pool.
        pool = futures.ThreadPoolExecutor(max_workers=2)

        def grpc_echo() -> int:
            calls = [pool.submit(s, r, timeout=30) for s, r in zip(echo_stubs, requests)]
            for call in calls:
                np.frombuffer(call.result(), dtype="<f4")
            return BATCH

        grpc_lookup(), grpc_echo()
        _progress("lookups over gRPC: embedding-PS vs echo")
        lookups, echoes = [], []
        for _ in range(ROUNDS):
            lookups.append(_rate(grpc_lookup, seconds))
            echoes.append(_rate(grpc_echo, seconds))
        client.close()
        pool.shutdown()
        for channel in channels:
            channel.close()
        return {
            "grpc_lookup_ids_per_s": statistics.median(lookups),
            "grpc_echo_ids_per_s": statistics.median(echoes),
        }
    finally:
        for proc in procs:
            proc.stop()


def run(args: argparse.Namespace) -> dict[str, float]:
    """Runs both parts and returns the figures with their ratios."""
    quick = getattr(args, "quick", False)
    seconds = 0.3 if quick else 1.5
    result = _in_process(100_000 if quick else 1_000_000, seconds)
    with tempfile.TemporaryDirectory(prefix="monolith-bench-") as workdir:
        result.update(_over_grpc(20_000 if quick else 200_000, seconds, workdir))
    result["lookup_vs_dict"] = result["lookup_ids_per_s"] / result["dict_lookup_ids_per_s"]
    result["grpc_lookup_vs_echo"] = result["grpc_lookup_ids_per_s"] / result["grpc_echo_ids_per_s"]
    result["memory_vs_payload"] = result["bytes_per_row"] / result["payload_bytes_per_row"]
    result["dim"] = DIM
    result["ids_per_call"] = BATCH
    result["bars_met"] = {
        "lookup_vs_dict>=10": result["lookup_vs_dict"] >= 10,
        "grpc_lookup_vs_echo>=0.5": result["grpc_lookup_vs_echo"] >= 0.5,
        "memory_vs_payload<=1.3": result["memory_vs_payload"] <= 1.3,
    }
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}
