"""Locust load test of the Predict API, with actions reported for a share of the calls.

Locust's documented gRPC pattern: gevent-patched gRPC, a client interceptor that fires
Locust's request event for every call (so Predict and ReportActions show in the stats, the
CSV/HTML reports and the SLO gate), and users holding one client each: `monolith_client`, as
a product backend calls monolith (without retries here: every failed call counts).

Each simulated user sends ranking requests: one MovieLens-100k user's features once
(broadcast by the server) and --candidates movies with their genres, pre-generated before
the test starts so no feature building is timed. Every call carries a fresh request_id, so
model-serving logs its impressions; for --action-share of the calls the user "clicks" one
candidate, reported to the joiner (ReportActions) under that request_id: the load drives
the whole loop (impressions, join, samples, online training), not only scoring.

    locust -f clients/locust/locustfile.py --headless -u 20 -r 5 -t 60s \\
        --host 127.0.0.1:8500 --joiner 127.0.0.1:8600 --csv out/load --html out/load.html

The run exits 1 when the SLO gate fails: an error ratio above --max-error-ratio or a
Predict p95 above --max-p95-ms (`python clients/locust/loadtest.py` runs it against
`monolith up`; `make loadtest` does that).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np

# Before any channel exists: gRPC's C core must cooperate with gevent's loop, or a call in
# flight blocks every user of this worker.
grpc_gevent.init_gevent()

import grpc_interceptor  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

from monolith_client import MonolithClient, MonolithClientError  # noqa: E402

_LOGGER = logging.getLogger("monolith.locust")
USER_FEATURES = ("user_id", "age", "gender", "occupation", "zip")
# Ranking calls drawn before the test, reused at random with a fresh request_id each call:
# (the user's features, the candidates' features, the candidates' item ids).
Ranking = tuple[dict[str, Any], dict[str, list[Any]], list[str]]
_POOL: list[Ranking] = []


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("monolith")
    group.add_argument("--joiner", default="", help="joiner host:port for ReportActions ('' : no actions)")
    group.add_argument("--candidates", type=int, default=100, help="candidates per ranking request (default 100)")
    group.add_argument("--action-share", type=float, default=0.1, help="share of calls that report an action")
    group.add_argument("--model-name", default="monolith", help="model_spec.name")
    group.add_argument("--signature-name", default="serving_default", help="model_spec.signature_name")
    group.add_argument("--call-timeout", type=float, default=10.0, help="seconds per gRPC call")
    group.add_argument("--pool-size", type=int, default=1000, help="distinct ranking requests pre-generated")
    group.add_argument("--seed", type=int, default=0, help="seed of the pre-generated requests")
    group.add_argument("--max-error-ratio", type=float, default=0.0, help="SLO gate: failed calls / calls")
    group.add_argument("--max-p95-ms", type=float, default=500.0, help="SLO gate: Predict's p95 latency")


def ranking(user: dict[str, Any], movies: list[dict[str, Any]]) -> Ranking:
    """One user (sent once, broadcast by the server) and its candidate movies with their genres."""
    candidates = {"movie_id": [int(m["movie_id"]) for m in movies], "genres": [list(m["genres"]) for m in movies]}
    return {name: user[name] for name in USER_FEATURES}, candidates, [str(m["movie_id"]) for m in movies]


def build_pool(options: Any) -> list[Ranking]:
    """Ranking calls from MovieLens-100k's users and movies (fetched into the data cache on first use).

    Candidates are drawn without replacement in proportion to how often each movie was
    rated, as a ranking stage sees popular items more often.

    Returns:
        (user features, candidate features, the candidates' item ids as actions report them).
    """
    from monolith.data.feature_ids import feature_ids
    from monolith.data.movielens import load_movielens, raw_feature_values

    raw = raw_feature_values()
    users, movies = raw["users"], raw["movies"]
    # Ratings carry hashed ids; the same hash maps each movie to its row.
    row_of = {int(h): i for i, h in enumerate(feature_ids("movie_id", np.array([m["movie_id"] for m in movies])))}
    counts = np.bincount([row_of[int(h)] for h in load_movielens().ids["movie_id"]], minlength=len(movies))
    popularity = counts / counts.sum()
    rng = np.random.default_rng(options.seed)
    candidates = min(options.candidates, int(np.count_nonzero(counts)))
    pool = []
    for _ in range(options.pool_size):
        user = users[rng.integers(len(users))]
        picked = [movies[i] for i in rng.choice(len(movies), size=candidates, replace=False, p=popularity)]
        pool.append(ranking(user, picked))
    return pool


@events.init.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    # The master only coordinates: workers (or a standalone run) build the requests.
    from locust.runners import MasterRunner

    if isinstance(environment.runner, MasterRunner) or environment.parsed_options is None:
        return
    started = time.perf_counter()
    _POOL[:] = build_pool(environment.parsed_options)
    _LOGGER.info("%d ranking requests of %d candidates ready in %.1f s", len(_POOL),
                 environment.parsed_options.candidates, time.perf_counter() - started)  # fmt: skip


class LocustInterceptor(grpc_interceptor.ClientInterceptor):
    """Fires Locust's request event for every call, with its latency and outcome."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def intercept(self, method: Any, request_or_iterator: Any, call_details: grpc.ClientCallDetails) -> Any:
        response = None
        exception = None
        length = 0
        started = time.perf_counter()
        try:
            response = method(request_or_iterator, call_details)
            length = response.result().ByteSize()  # waits for the call to complete
        except grpc.RpcError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=call_details.method.rsplit("/", 1)[-1],
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            response=response,
            context=None,
            exception=exception,
        )
        return response


class GrpcUser(User):
    """A Locust user with a monolith client whose every call is reported to Locust."""

    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        options = environment.parsed_options
        self.client = MonolithClient(
            self.host, options.model_name, options.signature_name, timeout=options.call_timeout,
            joiner_address=options.joiner or None, retries=0, interceptors=[LocustInterceptor(environment)],
        )  # fmt: skip

    def on_stop(self) -> None:
        self.client.close()


class RankingUser(GrpcUser):
    """A product backend ranking candidates for one user, and reporting some clicks."""

    host = "127.0.0.1:8500"

    @task
    def rank(self) -> None:
        options = self.environment.parsed_options
        user, candidates, item_ids = random.choice(_POOL)
        request_id = uuid.uuid4().hex
        try:
            scores = self.client.score(user, candidates, request_id=request_id)
        except MonolithClientError:
            return  # counted as a failure by the interceptor
        if self.client.joiner_address is not None and random.random() < options.action_share:
            # The user clicks the best-scored candidate, as a ranking would show it first.
            try:
                self.client.report_action(request_id, item_ids[int(np.argmax(scores))], kind="click")
            except MonolithClientError:
                pass  # counted as a failure by the interceptor


@events.quitting.add_listener
def _slo_gate(environment: Environment, **_: Any) -> None:
    """Sets the exit code: 1 when the error ratio or Predict's p95 breaks the SLO."""
    options = environment.parsed_options
    if options is None or environment.stats is None:
        return
    from locust.runners import WorkerRunner

    if isinstance(environment.runner, WorkerRunner):
        return  # the master (or a standalone run) judges the whole test
    total = environment.stats.total
    predict = environment.stats.get("Predict", "grpc")
    problems = []
    if total.num_requests == 0:
        problems.append("no calls were made")
    if total.fail_ratio > options.max_error_ratio:
        problems.append(f"error ratio {total.fail_ratio:.4f} > {options.max_error_ratio:g}")
    if predict.num_requests and predict.get_response_time_percentile(0.95) > options.max_p95_ms:
        problems.append(f"Predict p95 {predict.get_response_time_percentile(0.95):.0f} ms > {options.max_p95_ms:g} ms")
    if problems:
        _LOGGER.error("SLO gate failed: %s", "; ".join(problems))
        environment.process_exit_code = 1
    else:
        _LOGGER.info("SLO gate passed: %d calls, error ratio %.4f, Predict p95 %.0f ms", total.num_requests,
                     total.fail_ratio, predict.get_response_time_percentile(0.95) if predict.num_requests else 0)  # fmt: skip
