"""`monolith bench serving`: the Predict API against in-process scoring, and sync freshness.

1. Throughput and latency. A model trained on MovieLens-100k (by a `monolith trainer`
   process) is served by a `monolith serving` process over 2 embedding-PS shard processes
   and a dense-PS. Clients send Predict calls of 1 user x 100 candidate movies from
   CONCURRENCY threads with a plain TF Serving stub: `predict_qps`, `p50_ms`... The
   baseline, `inprocess_qps`, scores the same requests with the same model, parameters
   and rows in this process (local tables, no gRPC) from the same number of threads,
   with the serving process's TensorFlow threading and garbage-collector settings. The
   two alternate in ROUNDS rounds after a warm-up of both; figures are medians over
   rounds, and `predict_vs_inprocess` is their ratio at equal concurrency.
   Then batching: the same serving process (batching on, its defaults) against a second
   one started with `--batch-max-examples 0` (off), BATCHING_CONCURRENCY callers each,
   interleaved rounds: `batched_vs_unbatched_qps`.
2. Freshness while a trainer trains. A serving shard follows each training shard
   (`--sync-from`, 1 s interval) while a trainer process trains; a probe pushes a
   gradient for one id to a training shard and times until the serving shard returns
   the changed row: `freshness_p50_s`, `freshness_p99_s`.

`bars_met` holds the brief's bars for these figures; for a missed Predict bar, `limits`
holds a sampling profile of a serving process under the same load (sampling.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from monolith.harness.bench.cluster import start_parameter_servers
from monolith.harness.bench.measure import ROUNDS, concurrent_calls, interleaved, median
from monolith.common.channel import open_channel
from monolith.common.process import RoleProcess, free_port, start_role, wait_healthy
from monolith.common.server import tune_gc
from monolith.data.movielens import raw_feature_values
from monolith.dense_ps.client import DensePSClient
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.model.config import default_config_path, load_model_config
from monolith.serving.model import ServingModel
from monolith.trainer.backends import LocalDense, LocalEmbeddings

CANDIDATES = 100
CONCURRENCY = 2  # callers on each side: gRPC client threads, in-process scoring threads

BATCHING_CONCURRENCY = 16  # callers on each side of batching on vs off

BARS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "predict_vs_inprocess>=0.8": lambda r: r["predict_vs_inprocess"] >= 0.8,
    "p99_ms<=3*p50_ms": lambda r: r["p99_ms"] <= 3 * r["p50_ms"],
    "batched_vs_unbatched_qps>=2": lambda r: r["batched_vs_unbatched_qps"] >= 2.0,
    "freshness_p50<=2s": lambda r: r["freshness_p50_s"] <= 2.0,
    "freshness_p99<=5s": lambda r: r["freshness_p99_s"] <= 5.0,
}
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
                local.tables[chunk.table].upsert(chunk.rows, version=1)
    with DensePSClient(dense_address) as dense:
        _, params = dense.pull()
    store = LocalDense(config.model.optimizer)
    store.init(params)
    model = ServingModel(config, local, store)
    model.refresh_dense()
    return model


def _fill_tables(config_path: str, ps: list[str], dense_address: str, workdir: str) -> None:
    """One pass of a `monolith trainer` process over MovieLens-100k."""
    trainer = RoleProcess(
        ["--log-level", "WARNING", "trainer", "--config", config_path, "--embedding-ps", ",".join(ps),
         "--dense-ps", dense_address, "--part", "all"],
        os.path.join(workdir, "fill-trainer.log"),
    )  # fmt: skip
    code = trainer.process.wait()
    trainer.stop()
    if code != 0:
        raise RuntimeError(f"the trainer filling the tables exited {code}; see {workdir}/fill-trainer.log")


def _serving_tf_threads() -> None:
    """TensorFlow's threading as `monolith serving` sets it (one thread per call).

    Must run before TensorFlow's runtime starts, i.e. before this process runs any op.
    """
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _start_serving(config_path: str, ps: list[str], dense_address: str, log: str,
                   profile_out: str | None = None, extra: tuple[str, ...] = ()) -> tuple[RoleProcess, str]:  # fmt: skip
    args = ["serving", "--config", config_path, "--embedding-ps", ",".join(ps), "--dense-ps", dense_address, *extra]
    if profile_out is None:
        proc, address = start_role(args, log)
    else:
        port = free_port()
        flags = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
        proc = RoleProcess(
            [profile_out, "--log-level", "WARNING", *args, *flags], log, module="monolith.harness.bench.sampling"
        )
        address = f"127.0.0.1:{port}"
    wait_healthy(address)
    return proc, address


def _throughput(config_path: str, workdir: str, seconds: float, limits: dict[str, list[str]]) -> dict[str, Any]:
    config = load_model_config(config_path)
    procs: list[RoleProcess] = []
    try:
        ps, dense_address = start_parameter_servers(config_path, workdir, procs, "throughput")
        _progress("a trainer process trains on MovieLens-100k to fill the tables")
        _fill_tables(config_path, ps, dense_address, workdir)
        proc, serving_address = _start_serving(config_path, ps, dense_address, os.path.join(workdir, "serving.log"))
        procs.append(proc)

        rng = np.random.default_rng(0)
        requests = _requests(200, rng)
        protos = [_to_proto(r) for r in requests]
        local = _load_local_copy(config, ps, dense_address)
        channel = open_channel(serving_address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def inprocess(i: int) -> None:
            local.predict(requests[i % len(requests)])

        def over_grpc(i: int) -> None:
            stub.Predict(protos[i % len(protos)], timeout=30)

        _progress(f"warm-up, then {ROUNDS} rounds: in-process scoring vs Predict over gRPC, {CONCURRENCY} threads each")
        concurrent_calls(inprocess, CONCURRENCY, seconds / 2), concurrent_calls(over_grpc, CONCURRENCY, seconds / 2)
        tune_gc()  # the serving process's settings, applied once everything is loaded
        rounds = interleaved({
            "inprocess": lambda: concurrent_calls(inprocess, CONCURRENCY, seconds),
            "grpc": lambda: concurrent_calls(over_grpc, CONCURRENCY, seconds),
        })  # fmt: skip
        channel.close()
        ms = np.concatenate([np.array(latencies) for _, latencies in rounds["grpc"]]) * 1000
        local_ms = np.concatenate([np.array(latencies) for _, latencies in rounds["inprocess"]]) * 1000
        result: dict[str, Any] = {
            "predict_qps": median([qps for qps, _ in rounds["grpc"]]),
            "inprocess_qps": median([qps for qps, _ in rounds["inprocess"]]),
            "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()),
            "inprocess_p50_ms": float(np.percentile(local_ms, 50)),
            "inprocess_p99_ms": float(np.percentile(local_ms, 99)),
            "concurrency": CONCURRENCY,
            "rounds": ROUNDS,
            "candidates_per_request": CANDIDATES,
        }
        result["predict_vs_inprocess"] = result["predict_qps"] / result["inprocess_qps"]
        result.update(_batching(config_path, ps, dense_address, serving_address, protos, seconds, workdir, procs))
        missed = [bar for bar in ("predict_vs_inprocess>=0.8", "p99_ms<=3*p50_ms", "batched_vs_unbatched_qps>=2")
                  if not BARS[bar](result)]  # fmt: skip
        if missed:  # one profile of the serving process under the same load explains each
            profile = _profile_serving(config_path, ps, dense_address, protos, seconds, workdir)
            figures = (f"Predict {result['predict_qps']:.0f} QPS (p50 {result['p50_ms']:.1f} ms, p99 "
                       f"{result['p99_ms']:.1f} ms) vs in-process {result['inprocess_qps']:.0f} QPS at {CONCURRENCY} "
                       f"callers; batched {result['batched_qps_16']:.0f} vs unbatched {result['unbatched_qps_16']:.0f} "
                       f"QPS at {BATCHING_CONCURRENCY}")  # fmt: skip
            for bar in missed:
                limits[bar] = [figures, *profile]
        return result
    finally:
        for proc in procs:
            proc.stop()


def _batching(config_path: str, ps: list[str], dense_address: str, batched_address: str,
              protos: list[predict_pb2.PredictRequest], seconds: float, workdir: str,
              procs: list[RoleProcess]) -> dict[str, Any]:  # fmt: skip
    """Batching on (the serving process above) vs off (a second one), 16 callers each, interleaved."""
    proc, unbatched_address = _start_serving(
        config_path, ps, dense_address, os.path.join(workdir, "serving-unbatched.log"),
        extra=("--batch-max-examples", "0"),
    )  # fmt: skip
    procs.append(proc)
    channels = {"batched": open_channel(batched_address), "unbatched": open_channel(unbatched_address)}
    try:
        stubs = {side: prediction_service_pb2_grpc.PredictionServiceStub(c) for side, c in channels.items()}

        def calls(side: str) -> Callable[[], tuple[float, list[float]]]:
            stub = stubs[side]
            return lambda: concurrent_calls(
                lambda i: stub.Predict(protos[i % len(protos)], timeout=30), BATCHING_CONCURRENCY, seconds
            )

        _progress(f"batching on vs off: {ROUNDS} rounds, {BATCHING_CONCURRENCY} callers each")
        for side in channels:
            calls(side)()  # warm-up
        rounds = interleaved({side: calls(side) for side in channels})
    finally:
        for channel in channels.values():
            channel.close()
    batched = median([qps for qps, _ in rounds["batched"]])
    unbatched = median([qps for qps, _ in rounds["unbatched"]])
    ms = np.concatenate([np.array(latencies) for _, latencies in rounds["batched"]]) * 1000
    return {
        "batched_qps_16": batched,
        "unbatched_qps_16": unbatched,
        "batched_vs_unbatched_qps": batched / unbatched,
        "batched_p50_ms_16": float(np.percentile(ms, 50)),
        "batched_p99_ms_16": float(np.percentile(ms, 99)),
    }


def _profile_serving(config_path: str, ps: list[str], dense_address: str, protos: list[predict_pb2.PredictRequest],
                     seconds: float, workdir: str) -> list[str]:  # fmt: skip
    """A sampling profile of a second serving process under the same load (startup excluded)."""
    _progress("profiling a serving process under the same load (a bar was missed)")
    out = os.path.join(workdir, "serving-profile.json")
    proc, address = _start_serving(config_path, ps, dense_address, os.path.join(workdir, "serving-profiled.log"), out)
    try:
        with open_channel(address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            predict = lambda i: stub.Predict(protos[i % len(protos)], timeout=30)  # noqa: E731
            concurrent_calls(predict, CONCURRENCY, seconds / 2)  # warm-up
            os.kill(proc.process.pid, signal.SIGUSR1)  # the profile starts here
            concurrent_calls(predict, CONCURRENCY, 2 * seconds)
    finally:
        proc.stop()
    try:
        with open(out, encoding="utf-8") as f:
            return [f"serving process, {CONCURRENCY} callers (threads waiting on the PS show as _blocking):",
                    *json.load(f)]  # fmt: skip
    except (OSError, ValueError) as exc:
        return [f"no profile written ({exc})"]


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
        name = config.features[0].table.name
        rng = np.random.default_rng(1)
        lags = []
        with ShardedEmbeddingClient(training, config.table_dims()) as train_client, \
                ShardedEmbeddingClient(serving, config.table_dims()) as serve_client:  # fmt: skip
            _progress(f"freshness: {probes} probes while a trainer trains")
            for k in range(probes):
                probe_id = np.array([10**12 + k], dtype=np.int64)  # an id only the probe touches
                train_client.lookup({name: probe_id}, training=True)
                before = serve_client.lookup({name: probe_id})[name]
                gradient = np.full((1, config.table_dims()[name]), 1.0, np.float32)
                start = time.perf_counter()
                # No update time: the probe's row gets the table's data clock (the trainer's
                # MovieLens time); a wall-clock stamp would move the table's clock to today.
                train_client.apply_gradients({name: (probe_id, gradient)})
                while True:
                    now = serve_client.lookup({name: probe_id})[name]
                    if not np.array_equal(now, before) and np.any(now != 0):
                        after_grad = train_client.lookup({name: probe_id})[name]
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs both parts and returns the figures, the bars and what limits any missed."""
    _serving_tf_threads()
    config_path = getattr(args, "config", None) or default_config_path()
    quick = getattr(args, "quick", False)
    limits: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="monolith-bench-serving-") as workdir:
        result = _throughput(config_path, workdir, 0.6 if quick else 2.0, limits)
        result.update(_freshness(config_path, workdir, 10 if quick else 40))
    result["bars_met"] = {bar: check(result) for bar, check in BARS.items()}
    for bar in ("freshness_p50<=2s", "freshness_p99<=5s"):
        if not result["bars_met"][bar]:
            limits[bar] = [f"freshness p50 {result['freshness_p50_s']:.2f} s, p99 {result['freshness_p99_s']:.2f} s over "
                           f"{result['freshness_probes']} probes with a {result['sync_interval_s']:g} s sync while a "
                           "trainer trains on the same 2 cores"]  # fmt: skip
    result["limits"] = limits
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
