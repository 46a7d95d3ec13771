"""`monolith bench serving`: the Predict API against in-process scoring, and sync freshness.

1. Throughput and latency. A model trained on MovieLens-100k is served by a
   `monolith serving` process over 2 embedding-PS shard processes and a dense-PS. Clients
   send Predict calls of 1 user x 100 candidate movies at a fixed concurrency for a fixed
   time, with a plain TF Serving stub: `predict_qps`, `p50_ms`, `p99_ms`. The baseline,
   `inprocess_qps`, scores the same requests with the same model, parameters and rows in
   this process (local tables, no gRPC), single-threaded.
2. Freshness while a trainer trains. A serving shard follows each training shard
   (`--sync-from`, 1 s interval) while a trainer process trains; a probe pushes a
   gradient for one id to a training shard and times until the serving shard returns
   the changed row: `freshness_p50_s`, `freshness_p99_s`.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from monolith.bench.cluster import start_parameter_servers
from monolith.common.process import RoleProcess, start_role, wait_healthy
from monolith.data.movielens import load_movielens, raw_feature_values
from monolith.dense_ps.client import DensePSClient
from monolith.embedding.table import RowBatch
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import default_config_path, load_model_config
from monolith.serving.model import ServingModel
from monolith.trainer.backends import LocalDense, LocalEmbeddings
from monolith.trainer.worker import TrainerWorker

CANDIDATES = 100
CONCURRENCY = 2
USER_FEATURES = ("user_id", "age", "gender", "occupation", "zip")


def _progress(message: str) -> None:
    print(f"[bench serving] {message}", file=sys.stderr, flush=True)


def _requests(count: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Ranking requests: one user's features (outer size 1) and 100 candidates' features."""
    raw = raw_feature_values()
    users, movies = raw["users"], raw["movies"]
    out = []
    for _ in range(count):
        u = users[int(rng.integers(len(users)))]
        picked = [movies[int(i)] for i in rng.choice(len(movies), CANDIDATES, replace=False)]
        width = max(len(m["genres"]) for m in picked)
        request = {name: np.array([u[name]], dtype=object) for name in USER_FEATURES}
        request["movie_id"] = np.array([m["movie_id"] for m in picked], dtype=np.int64)
        request["genres"] = np.array([m["genres"] + [""] * (width - len(m["genres"])) for m in picked], dtype=object)
        out.append(request)
    return out


def _to_proto(request: dict[str, np.ndarray]) -> predict_pb2.PredictRequest:
    proto = predict_pb2.PredictRequest()
    proto.model_spec.name = "monolith"
    for name, values in request.items():
        if values.dtype == object:
            proto.inputs[name].CopyFrom(tf.make_tensor_proto(values.astype(str).astype(bytes), dtype=tf.string))
        else:
            proto.inputs[name].CopyFrom(tf.make_tensor_proto(values, dtype=tf.int64))
    return proto


def _load_local_copy(config, ps: list[str], dense_address: str) -> ServingModel:  # type: ignore[no-untyped-def]
    """The same rows and dense parameters in this process, for the in-process baseline."""
    local = LocalEmbeddings(config.tables())
    with ShardedEmbeddingClient(ps, config.table_dims()) as client:
        for shard in range(len(ps)):
            for chunk in client.export(shard, include_optimizer_state=False):
                ids = np.frombuffer(chunk.ids, "<i8")
                values = np.frombuffer(chunk.values, "<f4").reshape(chunk.num_rows, chunk.width)
                times = np.frombuffer(chunk.update_times, "<u4")
                local.tables[chunk.slot].upsert(RowBatch(ids, values, times), version=1)
    with DensePSClient(dense_address) as dense:
        _, params = dense.pull()
    store = LocalDense(config.model.optimizer)
    store.init(params)
    model = ServingModel(config, local, store)
    model.refresh_dense()
    return model


def _throughput(config_path: str, workdir: str, seconds: float) -> dict[str, float]:
    config = load_model_config(config_path)
    procs: list[RoleProcess] = []
    try:
        ps, dense_address = start_parameter_servers(config_path, workdir, procs, "throughput")
        _progress("training on MovieLens-100k to fill the tables")
        data = load_movielens()
        with ShardedEmbeddingClient(ps, config.table_dims()) as sparse, DensePSClient(dense_address) as dense:
            worker = TrainerWorker(config, sparse, dense)
            for batch in data.batches(config.training.batch_size):
                worker.train(batch)
            worker.close()
        proc, serving_address = start_role(
            ["serving", "--config", config_path, "--embedding-ps", ",".join(ps), "--dense-ps", dense_address],
            os.path.join(workdir, "serving.log"),
        )
        procs.append(proc)
        wait_healthy(serving_address)

        rng = np.random.default_rng(0)
        requests = _requests(200, rng)
        protos = [_to_proto(r) for r in requests]

        _progress("in-process scoring (local tables, same rows and parameters)")
        local = _load_local_copy(config, ps, dense_address)
        for r in requests[:10]:
            local.predict(r)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            local.predict(requests[done % len(requests)])
            done += 1
        inprocess_qps = done / (time.perf_counter() - start)

        _progress(f"Predict over gRPC at concurrency {CONCURRENCY}")
        channel = grpc.insecure_channel(serving_address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for p in protos[:10]:
            stub.Predict(p, timeout=30)
        # The harness's own garbage collections must not show up as server latency.
        gc.freeze()
        gc.disable()
        latencies: list[float] = []
        lock = threading.Lock()
        deadline = time.perf_counter() + seconds

        def client(k: int) -> None:
            i = k
            mine = []
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                stub.Predict(protos[i % len(protos)], timeout=30)
                mine.append(time.perf_counter() - t)
                i += CONCURRENCY
            with lock:
                latencies.extend(mine)

        start = time.perf_counter()
        with futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(client, range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
        gc.enable()
        channel.close()
        ms = np.array(latencies) * 1000
        return {
            "predict_qps": len(latencies) / elapsed,
            "inprocess_qps": inprocess_qps,
            "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()),
            "concurrency": CONCURRENCY,
            "candidates_per_request": CANDIDATES,
        }
    finally:
        for proc in procs:
            proc.stop()


def _freshness(config_path: str, workdir: str, probes: int) -> dict[str, float]:
    config = load_model_config(config_path)
    procs: list[RoleProcess] = []
    try:
        training, dense_address = start_parameter_servers(config_path, workdir, procs, "freshness")
        serving = []
        for shard in range(2):
            proc, address = start_role(
                ["embedding-ps", "--shard", str(shard), "--num-shards", "2", "--config", config_path,
                 "--role", "serving", "--sync-from", training[shard], "--sync-interval", "1"],
                os.path.join(workdir, f"serving-ps{shard}.log"),
            )  # fmt: skip
            procs.append(proc)
            serving.append(address)
        for address in serving:
            wait_healthy(address)
        trainer = RoleProcess(
            ["--log-level", "WARNING", "trainer", "--config", config_path, "--embedding-ps", ",".join(training),
             "--dense-ps", dense_address, "--part", "all", "--epochs", "1000"],
            os.path.join(workdir, "trainer.log"),
        )  # fmt: skip
        procs.append(trainer)
        slot = config.features[0].table.name
        rng = np.random.default_rng(1)
        lags = []
        with ShardedEmbeddingClient(training, config.table_dims()) as train_client, \
                ShardedEmbeddingClient(serving, config.table_dims()) as serve_client:  # fmt: skip
            _progress(f"freshness: {probes} probes while a trainer trains")
            for k in range(probes):
                probe_id = np.array([10**12 + k], dtype=np.int64)  # an id only the probe touches
                train_client.lookup({slot: probe_id}, training=True)
                before = serve_client.lookup({slot: probe_id})[slot]
                gradient = np.full((1, config.table_dims()[slot]), 1.0, np.float32)
                start = time.perf_counter()
                train_client.apply_gradients({slot: (probe_id, gradient)}, update_time=time.time())
                while True:
                    now = serve_client.lookup({slot: probe_id})[slot]
                    if not np.array_equal(now, before) and np.any(now != 0):
                        after_grad = train_client.lookup({slot: probe_id})[slot]
                        if np.allclose(now, after_grad):
                            break
                    if time.perf_counter() - start > 30:
                        raise TimeoutError("serving never saw the probe's update")
                    time.sleep(0.005)
                lags.append(time.perf_counter() - start)
                time.sleep(float(rng.uniform(0, 0.5)))
            trainer_alive = trainer.process.poll() is None
        return {
            "freshness_p50_s": float(np.percentile(lags, 50)),
            "freshness_p99_s": float(np.percentile(lags, 99)),
            "freshness_probes": probes,
            "sync_interval_s": 1.0,
            "trainer_training_during_probes": trainer_alive,
        }
    finally:
        for proc in procs:
            proc.stop()


def run(args: argparse.Namespace) -> dict:
    config_path = getattr(args, "config", None) or default_config_path()
    quick = getattr(args, "quick", False)
    with tempfile.TemporaryDirectory(prefix="monolith-bench-serving-") as workdir:
        result = _throughput(config_path, workdir, 3.0 if quick else 10.0)
        result.update(_freshness(config_path, workdir, 10 if quick else 40))
    result["predict_vs_inprocess"] = result["predict_qps"] / result["inprocess_qps"]
    result["bars_met"] = {
        "predict_qps>=0.25*inprocess": result["predict_vs_inprocess"] >= 0.25,
        "p99<=3*p50": result["p99_ms"] <= 3 * result["p50_ms"],
        "freshness_p50<=1s": result["freshness_p50_s"] <= 1.0,
        "freshness_p99<=5s": result["freshness_p99_s"] <= 5.0,
    }
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
