"""`monolith bench table`: the collisionless table in process and the embedding-PS over gRPC.

Every ratio compares two sides measured in the same run, interleaved in rounds (the side
that goes first alternates) after a warm-up of both, with the same garbage-collector
settings as the servers (`tune_gc`); each figure is the median over rounds (measure.py).

- lookup_ids_per_s vs dict_lookup_ids_per_s: existing ids → embeddings in the table, vs
  a Python dict mapping the same ids to row indices;
- bytes_per_row (measured) vs payload_bytes_per_row (key + embedding + optimizer state);
- incremental_export_small_ms vs incremental_export_large_ms: what a train→serve sync
  asks for (`export(since)` plus `deleted_since(since)`) when 10,000 rows changed, in a
  10,000-row table and in a large one (10,000,000 rows; 100,000 with --quick);
- lookup_p99_ms_idle vs lookup_p99_ms_during_sweep: 4096-id lookups on the large table
  alone, and while expiry sweeps (`expire`) run beside them one after another (1 ms
  apart), each evicting the next ~1,000 oldest rows;
- grpc_lookup_ids_per_s vs grpc_echo_ids_per_s: 2 shard processes on loopback through
  the sharded client, 4096 ids per call, vs the same calls to 2 bare gRPC echo processes
  moving the same bytes.

`bars_met` holds the brief's bars for these figures. For each bar missed, `limits` holds
a sampling profile of the slow side (sampling.py): what limits it, measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures
from typing import Any, Callable

import grpc
import numpy as np
import yaml

from monolith.harness.bench import echo
from monolith.harness.bench.measure import interleaved, median, rate
from monolith.harness.bench.sampling import Sampler, profile_while
from monolith.common.channel import ChannelConfig, open_channel
from monolith.common.process import RoleProcess, free_port, start_role, wait_healthy
from monolith.common.server import tune_gc
from monolith.embedding.config import TableConfig
from monolith.embedding.table import EmbeddingTable, RowBatch
from monolith.embedding_ps.client import ShardedEmbeddingClient

DIM = 16
BATCH = 4096
CHANGED = 10_000  # rows changed between two syncs
EXPORT_CHUNK = 65_536  # the embedding-PS's default export chunk
EXPIRE_AFTER = 1_000_000.0  # seconds; the data clock below makes sweeps evict a slice each
ROWS_PER_SECOND = 1_000  # rows stamped with each second of data time in the large table
T0 = 1_700_000_000  # data time of the oldest row
SWEEP_GAP = 0.001  # seconds between the end of one expiry sweep and the start of the next

BARS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "lookup_vs_dict>=10": lambda r: r["lookup_vs_dict"] >= 10,
    "memory_vs_payload<=1.3": lambda r: r["memory_vs_payload"] <= 1.3,
    "incremental_export_large<=3*small": lambda r: (
        r["incremental_export_large_ms"] <= 3 * r["incremental_export_small_ms"]
    ),
    "lookup_p99_during_sweep<=3*idle": lambda r: r["lookup_p99_ms_during_sweep"] <= 3 * r["lookup_p99_ms_idle"],
    "grpc_lookup_vs_echo>=0.5": lambda r: r["grpc_lookup_vs_echo"] >= 0.5,
}


def _progress(message: str) -> None:
    print(f"[bench table] {message}", file=sys.stderr, flush=True)


def _missed(result: dict[str, Any], bar: str) -> bool:
    return not BARS[bar](result)


# ------------------------------------------------------------------ lookups vs dict


def _in_process(rows: int, seconds: float, limits: dict[str, list[str]]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    ids = rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
    table = EmbeddingTable(TableConfig(name="bench", dim=DIM))
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

    rate(table_lookup, seconds / 4), rate(dict_lookup, seconds / 4)  # warm-up (compiles the kernel)
    _progress("lookups: table vs dict")
    rates = interleaved({"table": lambda: rate(table_lookup, seconds), "dict": lambda: rate(dict_lookup, seconds)})
    result: dict[str, Any] = {
        "rows": rows,
        "insert_ids_per_s": insert_rate,
        "lookup_ids_per_s": median(rates["table"]),
        "dict_lookup_ids_per_s": median(rates["dict"]),
        "bytes_per_row": stats.bytes / stats.rows,
        "payload_bytes_per_row": 8 + 4 * table.width,
    }
    result["lookup_vs_dict"] = result["lookup_ids_per_s"] / result["dict_lookup_ids_per_s"]
    result["memory_vs_payload"] = result["bytes_per_row"] / result["payload_bytes_per_row"]
    if _missed(result, "lookup_vs_dict>=10"):
        limits["lookup_vs_dict>=10"] = profile_while(table_lookup, 2 * seconds)
    if _missed(result, "memory_vs_payload<=1.3"):
        # Not a time profile: the table reports only its total bytes.
        limits["memory_vs_payload<=1.3"] = [
            f"{stats.bytes} bytes held for {stats.rows} live rows of {result['payload_bytes_per_row']} payload bytes"
        ]
    return result


# ------------------------------------------------- cost of change vs size of table


def _changed_table(rows: int, name: str, expire_after: float | None) -> tuple[EmbeddingTable, np.ndarray]:
    """A table of `rows` rows written at version 1, then CHANGED of them updated at version 2.

    Row i is stamped with data time T0 + i // ROWS_PER_SECOND, so an expiry sweep at a
    later clock evicts the oldest rows a slice at a time. Returns the table and its ids.
    """
    rng = np.random.default_rng(2)
    table = EmbeddingTable(TableConfig(name=name, dim=DIM, expire_after=expire_after), initial_capacity=rows)
    ids = rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
    chunk = 1 << 16
    for start in range(0, rows, chunk):
        part = ids[start : start + chunk]
        times = (T0 + np.arange(start, start + part.shape[0]) // ROWS_PER_SECOND).astype(np.uint32)
        values = rng.standard_normal((part.shape[0], DIM), dtype=np.float32)
        table.upsert(RowBatch(part, values, times), version=1)
    changed = ids[rng.choice(rows, CHANGED, replace=False)]
    table.apply_gradients(changed, np.ones((CHANGED, DIM), np.float32), T0 + rows // ROWS_PER_SECOND, version=2)
    return table, ids


def _incremental_export(table: EmbeddingTable) -> int:
    """What a sync pulls after version 1: changed rows and deleted ids; returns the rows."""
    exported = sum(batch.ids.shape[0] for batch in table.export(1, False, EXPORT_CHUNK))
    table.deleted_since(1)
    return exported


def _export_ms(table: EmbeddingTable, repeats: int) -> float:
    """Median milliseconds of `repeats` incremental exports."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        exported = _incremental_export(table)
        times.append((time.perf_counter() - start) * 1000)
        if exported != CHANGED:
            raise AssertionError(f"the incremental export carried {exported} rows, not the {CHANGED} changed")
    return median(times)


class _Sweeper:
    """Expiry sweeps back to back on a thread, each one second of data time later than the last.

    The clock stops advancing once half the rows are due, so lookups of the newer half
    always hit rows and later sweeps evict nothing (they still walk the table).
    """

    def __init__(self, table: EmbeddingTable, rows: int) -> None:
        self._table = table
        self._last_step = rows // ROWS_PER_SECOND // 2
        self._step = 0
        self._version = 3
        self.durations: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ident(self) -> int | None:
        return self._thread.ident if self._thread else None

    def __enter__(self) -> _Sweeper:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-sweep", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def sweep(self) -> None:
        self._step = min(self._step + 1, self._last_step)
        now = T0 + EXPIRE_AFTER - 1 + self._step  # evicts rows stamped before T0 + step
        start = time.perf_counter()
        self._table.expire(self._version, now)
        self.durations.append(time.perf_counter() - start)
        self._version += 1

    def _run(self) -> None:
        # A short pause between sweeps, as a periodic task has: back to back, a sweep of a
        # small table would retake the lock (and the interpreter) before a waiting lookup
        # could run. A sweep of the large table is long beside it, so one is nearly always
        # running while the lookups are timed.
        while not self._stop.wait(SWEEP_GAP):
            self.sweep()


def _lookup_latencies(table: EmbeddingTable, batches: list[np.ndarray], seconds: float) -> np.ndarray:
    latencies = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        table.lookup(batches[i % len(batches)])
        latencies.append(time.perf_counter() - t)
        i += 1
    return np.array(latencies) * 1000


def _change_scaling(large_rows: int, seconds: float, limits: dict[str, list[str]]) -> dict[str, Any]:
    _progress(f"building a {CHANGED}-row and a {large_rows}-row table, {CHANGED} rows changed in each")
    small, _ = _changed_table(CHANGED, "small", None)
    large, large_ids = _changed_table(large_rows, "large", EXPIRE_AFTER)
    repeats = 10
    _export_ms(small, 2), _export_ms(large, 2)  # warm-up (compiles the kernels)
    _progress("incremental export: small vs large table")
    export_ms = interleaved({"small": lambda: _export_ms(small, repeats), "large": lambda: _export_ms(large, repeats)})
    result: dict[str, Any] = {
        "incremental_export_small_ms": median(export_ms["small"]),
        "incremental_export_large_ms": median(export_ms["large"]),
        "incremental_export_rows": CHANGED,
        "large_table_rows": large_rows,
    }
    if _missed(result, "incremental_export_large<=3*small"):
        limits["incremental_export_large<=3*small"] = profile_while(lambda: _incremental_export(large), 2.0)

    # Lookups of rows the sweeps never reach (the newer half of the table).
    rng = np.random.default_rng(3)
    newer = large_ids[large_rows // 2 :]
    batches = [newer[rng.integers(0, newer.shape[0], BATCH)] for _ in range(64)]
    sweeper = _Sweeper(large, large_rows)
    _lookup_latencies(large, batches, seconds / 4)
    sweeper.sweep()  # warm-up

    def during_sweep() -> float:
        with sweeper:
            return float(np.percentile(_lookup_latencies(large, batches, seconds), 99))

    _progress("4096-id lookups on the large table: idle vs beside expiry sweeps")
    p99 = interleaved({
        "idle": lambda: float(np.percentile(_lookup_latencies(large, batches, seconds), 99)),
        "sweep": during_sweep,
    })  # fmt: skip
    result.update({
        "lookup_p99_ms_idle": median(p99["idle"]),
        "lookup_p99_ms_during_sweep": median(p99["sweep"]),
        "sweep_ms": median([d * 1000 for d in sweeper.durations]),
        "sweeps": len(sweeper.durations),
        "evictions": large.stats().evictions,
    })  # fmt: skip
    if _missed(result, "lookup_p99_during_sweep<=3*idle"):
        # The lookup thread (this one) and the sweep thread, waits included: a lookup
        # stalled behind the sweep shows up as time in the lock it waits for.
        threads = {threading.get_ident()}
        with Sampler(threads=threads, include_idle=True) as sampler, sweeper:
            assert sweeper.ident is not None
            threads.add(sweeper.ident)
            _lookup_latencies(large, batches, 2.0)
        limits["lookup_p99_during_sweep<=3*idle"] = sampler.summary()
    return result


# ----------------------------------------------------------------- over gRPC vs echo


def _start_shards(config: str, workdir: str, procs: list[RoleProcess], profile_dir: str | None) -> list[str]:
    """2 embedding-PS shard processes; under the sampling profiler when profile_dir is given."""
    addresses = []
    for shard in range(2):
        args = ["embedding-ps", "--shard", str(shard), "--num-shards", "2", "--config", config]
        log = os.path.join(workdir, f"ps{shard}{'-profiled' if profile_dir else ''}.log")
        if profile_dir is None:
            proc, address = start_role(args, log)
        else:
            port = free_port()
            out = os.path.join(profile_dir, f"ps{shard}.json")
            proc = RoleProcess(
                [out, "--log-level", "WARNING", *args, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"],
                log, module="monolith.harness.bench.sampling",
            )  # fmt: skip
            address = f"127.0.0.1:{port}"
        procs.append(proc)
        addresses.append(address)
    for address in addresses:
        wait_healthy(address)
    return addresses


def _loaded_client(addresses: list[str], rows: int) -> tuple[ShardedEmbeddingClient, list[np.ndarray]]:
    client = ShardedEmbeddingClient(addresses, {"bench": DIM})
    rng = np.random.default_rng(1)
    ids = rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
    _progress(f"loading {rows} ids into 2 shards")
    for i in range(0, rows, BATCH):
        client.lookup({"bench": ids[i : i + BATCH]}, training=True)
    return client, [ids[rng.integers(0, rows, BATCH)] for _ in range(64)]


def _over_grpc(rows: int, seconds: float, workdir: str, limits: dict[str, list[str]]) -> dict[str, Any]:
    config = os.path.join(workdir, "features.yaml")
    with open(config, "w", encoding="utf-8") as f:
        yaml.safe_dump({"features": [{"name": "bench", "dim": DIM}]}, f)
    procs: list[RoleProcess] = []
    try:
        echo_addresses = []
        for shard in range(2):
            port = free_port()
            procs.append(RoleProcess(["--port", str(port)], os.path.join(workdir, f"echo{shard}.log"), echo.__name__))
            echo_addresses.append(f"127.0.0.1:{port}")
        client, batches = _loaded_client(_start_shards(config, workdir, procs, None), rows)
        # The echo calls move what a lookup moves: each shard's share of the ids out,
        # its embeddings back.
        shares = [BATCH // 2, BATCH - BATCH // 2]
        # The echo server is a bare gRPC server (gRPC's default ping policy): no keepalive.
        channels = [open_channel(a, ChannelConfig(keepalive_seconds=None)) for a in echo_addresses]
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=60)
        echo_stubs = [echo.stub(c) for c in channels]
        requests = [(n * DIM * 4).to_bytes(8, "little") + bytes(n * 8 - 8) for n in shares]
        cursor = iter(range(1 << 62))

        def grpc_lookup() -> int:
            client.lookup({"bench": batches[next(cursor) % len(batches)]})
            return BATCH

        # The same fan-out as the sharded client: blocking calls on a thread pool.
        pool = futures.ThreadPoolExecutor(max_workers=2)

        def grpc_echo() -> int:
            calls = [pool.submit(s, r, timeout=30) for s, r in zip(echo_stubs, requests)]
            for call in calls:
                np.frombuffer(call.result(), dtype="<f4")
            return BATCH

        rate(grpc_lookup, seconds / 4), rate(grpc_echo, seconds / 4)  # warm-up: connections, kernels
        _progress("lookups over gRPC: embedding-PS vs echo")
        rates = interleaved({"ps": lambda: rate(grpc_lookup, seconds), "echo": lambda: rate(grpc_echo, seconds)})
        client.close()
        pool.shutdown()
        for channel in channels:
            channel.close()
        result: dict[str, Any] = {
            "grpc_lookup_ids_per_s": median(rates["ps"]),
            "grpc_echo_ids_per_s": median(rates["echo"]),
        }
        result["grpc_lookup_vs_echo"] = result["grpc_lookup_ids_per_s"] / result["grpc_echo_ids_per_s"]
    finally:
        for proc in procs:
            proc.stop()
    if _missed(result, "grpc_lookup_vs_echo>=0.5"):
        limits["grpc_lookup_vs_echo>=0.5"] = _profile_grpc_lookups(config, rows, seconds, workdir)
    return result


def _profile_grpc_lookups(config: str, rows: int, seconds: float, workdir: str) -> list[str]:
    """Profiles of the client (this process) and of each shard process during lookups."""
    _progress("profiling lookups over gRPC (a bar was missed)")
    procs: list[RoleProcess] = []
    profile_dir = os.path.join(workdir, "profiles")
    os.makedirs(profile_dir, exist_ok=True)
    try:
        client, batches = _loaded_client(_start_shards(config, workdir, procs, profile_dir), rows)
        cursor = iter(range(1 << 62))
        lookup = lambda: client.lookup({"bench": batches[next(cursor) % len(batches)]})  # noqa: E731
        for proc in procs:
            os.kill(proc.process.pid, signal.SIGUSR1)  # the shards' profiles start here, loading left out
        lines = ["client:", *profile_while(lookup, 2 * seconds)]
        client.close()
    finally:
        for proc in procs:
            proc.stop()
    for shard in range(2):
        path = os.path.join(profile_dir, f"ps{shard}.json")
        lines.append(f"shard {shard}:")
        lines.extend(_read_json_lines(path))
    return lines


def _read_json_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return list(json.load(f))
    except (OSError, ValueError) as exc:
        return [f"no profile written ({exc})"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every part and returns the figures, their ratios, the bars and what limits any missed."""
    quick = getattr(args, "quick", False)
    seconds = 0.3 if quick else 1.5
    tune_gc()  # the servers' settings, for the in-process sides too
    limits: dict[str, list[str]] = {}
    result = _in_process(100_000 if quick else 1_000_000, seconds, limits)
    result.update(_change_scaling(100_000 if quick else 10_000_000, seconds, limits))
    with tempfile.TemporaryDirectory(prefix="monolith-bench-") as workdir:
        result.update(_over_grpc(20_000 if quick else 200_000, seconds, workdir, limits))
    result["dim"] = DIM
    result["ids_per_call"] = BATCH
    result["bars_met"] = {bar: check(result) for bar, check in BARS.items()}
    result["limits"] = limits
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}
