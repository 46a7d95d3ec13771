"""The dense-PS over real gRPC: init, push/pull, bad input, /metrics, and the CLI process.

Every rejection is checked three ways: the exact status code, a message that names the
problem, and a server that afterwards holds exactly the parameters and version it held
before and still answers.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from helpers.metrics import metrics_url, read_metrics
from helpers.processes import MONOLITH, Command
from monolith.api.dense_ps.v1 import dense_ps_pb2 as pb
from monolith.api.dense_ps.v1 import dense_ps_pb2_grpc as pb_grpc
from monolith.common.process import free_port, wait_healthy
from monolith.common.errors import InvalidArgument
from monolith.common.server import MonolithServer, ServerConfig, Service, build_server
from monolith.dense_ps.client import DensePSClient
from monolith.model.config import DenseOptimizerConfig
from monolith.dense_ps.service import build_dense_ps
from monolith.dense_ps.store import DenseStore

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
SERVICE = "monolith.api.dense_ps.v1.DensePS"
LR = 0.125  # a power of two: SGD steps are exact in float32


def initial() -> dict[str, np.ndarray]:
    return {
        "dense/kernel": np.arange(12, dtype=np.float32).reshape(4, 3) / 8,
        "dense/bias": np.array([0.5, -0.25, 1.0], np.float32),
        "out/scale": np.array(2.0, np.float32),  # a scalar
    }


@dataclasses.dataclass
class DensePS:
    """A started dense-PS, a client, and a raw stub whose channel accepts any message size."""

    server: MonolithServer
    store: DenseStore
    client: DensePSClient
    channel: grpc.Channel
    stub: pb_grpc.DensePSStub

    def stop(self) -> None:
        self.client.close()
        self.channel.close()
        self.server.stop(grace=0)


def start_ps(optimizer: DenseOptimizerConfig = DenseOptimizerConfig(kind="sgd", learning_rate=LR), metrics: bool = False) -> DensePS:
    store = DenseStore(optimizer)
    server = build_dense_ps(store, ServerConfig(host="127.0.0.1", port=0, metrics_port=0 if metrics else None))
    server.start()
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(server.address, options=unlimited)
    return DensePS(server, store, DensePSClient(server.address, timeout=10), channel, pb_grpc.DensePSStub(channel))


@pytest.fixture(scope="module")
def trained() -> Iterator[DensePS]:
    """An initialized PS with two pushes applied, shared by the bad-input tests (which change nothing)."""
    ps = start_ps()
    ps.client.init(initial())
    ps.client.push({n: np.ones_like(v) for n, v in initial().items()})
    ps.client.push({"dense/bias": np.ones(3, np.float32)})
    yield ps
    ps.stop()


@pytest.fixture
def make_ps() -> Iterator[Callable[..., DensePS]]:
    """Starts fresh dense-PS servers the test owns (see `start_ps`); stops them after."""
    started: list[DensePS] = []

    def make(**kwargs: object) -> DensePS:
        started.append(start_ps(**kwargs))  # type: ignore[arg-type]
        return started[-1]

    yield make
    # In parallel: closing a /metrics endpoint waits out its 0.5 s poll.
    stoppers = [threading.Thread(target=ps.stop) for ps in started]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()


def assert_tensors(got: dict[str, np.ndarray] | None, expected: dict[str, np.ndarray]) -> None:
    assert got is not None
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == np.float32
        assert got[name].shape == np.shape(value), name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def tensor(name: str, values: np.ndarray, shape: tuple[int, ...] | None = None) -> pb.Tensor:
    values = np.asarray(values, "<f4")
    return pb.Tensor(name=name, shape=values.shape if shape is None else shape, values=values.tobytes())


# --------------------------------------------------------------------------- happy paths


def test_a_second_trainer_joining_gets_the_first_trainers_parameters(make_ps: Callable[..., DensePS]) -> None:
    ps = make_ps()
    with DensePSClient(ps.server.address, timeout=10) as second:
        first_version, first_held = ps.client.init(initial())
        ps.client.push({"dense/bias": np.ones(3, np.float32)})
        offered = {n: np.zeros_like(v) for n, v in initial().items()}  # a different random init

        version, held = second.init(offered)

    assert first_version == 1
    assert_tensors(first_held, initial())
    assert version == 2
    assert_tensors(held, initial() | {"dense/bias": initial()["dense/bias"] - LR})


def test_push_then_pull_applies_sgd_and_bumps_the_version(make_ps: Callable[..., DensePS]) -> None:
    ps = make_ps()
    ps.client.init(initial())
    grads = {"dense/kernel": np.full((4, 3), 2.0, np.float32), "out/scale": np.array(-1.0, np.float32)}

    assert ps.client.push(grads) == 2
    assert ps.client.push_async({"dense/bias": np.ones(3, np.float32)}).result(timeout=10) == 3
    version, tensors = ps.client.pull()
    unchanged = ps.client.pull(if_newer_than=3)
    _, bias_only = ps.client.pull(if_newer_than=2, names=["dense/bias"])
    stats = ps.client.stats()

    expected = {
        "dense/kernel": initial()["dense/kernel"] - 2 * LR,
        "dense/bias": initial()["dense/bias"] - LR,
        "out/scale": np.array(2.0 + LR, np.float32),
    }
    assert version == 3
    assert_tensors(tensors, expected)
    assert unchanged == (3, None)
    assert_tensors(bias_only, {"dense/bias": expected["dense/bias"]})
    assert (stats.version, stats.num_tensors, stats.parameters, stats.bytes) == (3, 3, 16, 64)
    assert (stats.pushes, stats.rejected_pushes, stats.optimizer) == (2, 0, "sgd")


def test_pull_answers_unchanged_without_tensors(trained: DensePS) -> None:
    response = trained.stub.Pull(pb.PullRequest(if_newer_than=trained.store.version), timeout=10)

    assert response.unchanged
    assert response.version == trained.store.version
    assert not response.tensors


def test_metrics_show_the_version_and_counters(make_ps: Callable[..., DensePS]) -> None:
    ps = make_ps(metrics=True)
    ps.client.init(initial())
    snapshot = ps.store.snapshot()
    ps.store.restore(4242, snapshot.tensors, snapshot.optimizer_state)  # a version no other store has
    ps.client.push({"dense/bias": np.ones(3, np.float32)})

    page = read_metrics(metrics_url(ps.server.metrics_port), timeout=10)

    # Every store in this process is a series of its own: this one is found by its version.
    assert 4243 in [s.value for s in page.matching("monolith_dense_version")]
    for name in ("monolith_dense_parameters", "monolith_dense_bytes", "monolith_dense_pushes_total",
                 "monolith_dense_rejected_pushes_total"):  # fmt: skip
        assert page.has(name), name


# --------------------------------------------------------------------------- bad input


def _assert_rejected(ps: DensePS, call: Callable[[], object], code: grpc.StatusCode, *fragments: str) -> None:
    """Runs a call that must fail; checks status, message, unchanged parameters, still serving."""
    before = ps.client.pull()
    with pytest.raises(grpc.RpcError) as info:
        call()
    details = info.value.details()
    assert info.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    after = ps.client.pull()
    assert after[0] == before[0]
    assert_tensors(after[1], before[1])  # type: ignore[arg-type]


def _bias(values: list[float]) -> pb.Tensor:
    return tensor("dense/bias", np.array(values, np.float32))


BAD_PUSHES: list[tuple[str, list[pb.Tensor], tuple[str, ...]]] = [
    ("unknown name", [_bias([1, 1, 1]), tensor("nope", np.ones(2))],
     ("push: unknown tensor(s) 'nope'", "held: dense/bias, dense/kernel, out/scale")),
    ("wrong shape", [_bias([1, 1, 1]), tensor("dense/kernel", np.ones((3, 4)))],
     ("gradient 'dense/kernel': expected shape (4, 3), got (3, 4)",)),
    ("bytes shorter than shape", [tensor("dense/bias", np.ones(2), shape=(3,))],
     ("gradient 'dense/bias'", "expected 12 bytes", "got 8")),
    ("bytes longer than shape", [tensor("dense/bias", np.ones(4), shape=(3,))],
     ("gradient 'dense/bias'", "expected 12 bytes", "got 16")),
    ("negative dim", [tensor("dense/kernel", np.ones(12), shape=(-4, -3))],
     ("gradient 'dense/kernel'", "negative size in shape (-4, -3)")),
    ("absurd dims", [tensor("dense/kernel", np.ones(12), shape=(2**62, 2**62))],
     ("gradient 'dense/kernel'", "expected 85070591730234615865843651857942052864 bytes", "got 48")),
    ("absurd rank", [tensor("out/scale", np.ones(1), shape=(1,) * 100)],
     ("gradient 'out/scale': rank 100 exceeds 32",)),
    ("zero beside a huge dim", [tensor("dense/kernel", np.ones(0), shape=(0, 2**62))],
     ("gradient 'dense/kernel': shape (0, 4611686018427387904) is too large",)),
    ("rank 65", [tensor("out/scale", np.ones(1), shape=(1,) * 65)], ("gradient 'out/scale': rank 65 exceeds 32",)),
    ("nan", [_bias([1, 1, 1]), tensor("dense/kernel", np.full((4, 3), np.nan))],
     ("gradient 'dense/kernel': 12 non-finite value(s) (NaN or Inf), first at index (0, 0)",)),
    ("inf", [_bias([1, np.inf, 1])], ("gradient 'dense/bias': 1 non-finite value(s)", "first at index (1,)")),
    ("repeated name", [_bias([1, 1, 1]), _bias([2, 2, 2])],
     ("gradient 'dense/bias' appears more than once",)),
    ("empty", [], ("push: at least one gradient is required",)),
]  # fmt: skip


@pytest.mark.parametrize(("gradients", "fragments"), [c[1:] for c in BAD_PUSHES], ids=[c[0] for c in BAD_PUSHES])
def test_a_bad_push_is_rejected_and_changes_nothing(
    trained: DensePS, gradients: list[pb.Tensor], fragments: tuple[str, ...]
) -> None:
    rejected = trained.client.stats().rejected_pushes
    call = lambda: trained.stub.Push(pb.PushRequest(gradients=gradients), timeout=10)  # noqa: E731

    _assert_rejected(trained, call, INVALID, *fragments)

    assert trained.client.stats().rejected_pushes == rejected + 1


def test_long_names_are_echoed_cut_and_keep_their_status(trained: DensePS) -> None:
    """Regression: a 100,000-character name in the message pushed the status past gRPC's
    metadata limit; the client saw RESOURCE_EXHAUSTED "Stream removed"."""
    long_name = "n" * 100_000
    many_names = [f"{i:04d}" + "m" * 1000 for i in range(200)]
    calls = {
        "push": lambda: trained.stub.Push(pb.PushRequest(gradients=[tensor(long_name, np.ones(2))]), timeout=10),
        "push twice": lambda: trained.stub.Push(
            pb.PushRequest(gradients=[tensor(long_name, np.ones(2)), tensor(long_name, np.ones(2))]), timeout=10
        ),
        "pull": lambda: trained.stub.Pull(pb.PullRequest(names=many_names), timeout=10),
    }
    for what, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == INVALID, (what, info.value.details()[:200])
        assert len(info.value.details()) <= 512, what
    assert "held: dense/bias, dense/kernel, out/scale" in info.value.details()


@pytest.mark.parametrize(
    ("request_", "fragments"),
    [
        (pb.PullRequest(names=["dense/bias", "nope"]), ("pull: unknown tensor(s) 'nope'",)),
        (pb.PullRequest(names=["dense/bias", "dense/bias"]), ("pull: tensor(s) 'dense/bias' named more than once",)),
        (pb.PullRequest(if_newer_than=-5), ("if_newer_than must be >= 0, got -5",)),
    ],
    ids=["unknown name", "repeated name", "negative version"],
)
def test_a_bad_pull_is_rejected(trained: DensePS, request_: pb.PullRequest, fragments: tuple[str, ...]) -> None:
    _assert_rejected(trained, lambda: trained.stub.Pull(request_, timeout=10), INVALID, *fragments)


@pytest.mark.parametrize(
    ("tensors", "fragments"),
    [
        ({**initial(), "extra": np.ones(2, np.float32)}, ("init: tensor 'extra' is not held here",)),
        ({**initial(), "dense/kernel": np.ones((4, 4), np.float32)},
         ("init: tensor 'dense/kernel' is held with shape (4, 3), got (4, 4)",)),
        ({n: v for n, v in initial().items() if n != "out/scale"},
         ("init: held tensor 'out/scale' is missing from the request",)),
    ],
    ids=["extra tensor", "other shape", "missing tensor"],
)  # fmt: skip
def test_init_with_another_layout_is_a_failed_precondition(
    trained: DensePS, tensors: dict[str, np.ndarray], fragments: tuple[str, ...]
) -> None:
    _assert_rejected(trained, lambda: trained.client.init(tensors), PRECONDITION, *fragments)


@pytest.mark.parametrize(
    ("tensors", "fragments"),
    [
        ([tensor("w", np.array([1.0, np.nan]))], ("init tensor 'w': 1 non-finite value(s)",)),
        ([tensor("w", np.ones(2)), tensor("w", np.ones(2))], ("init tensor 'w' appears more than once",)),
        ([tensor("w", np.ones(2), shape=(-2,))], ("init tensor 'w'", "negative size")),
        ([tensor("w", np.ones(0), shape=(2**62, 0))], ("init tensor 'w': shape (4611686018427387904, 0) is too large",)),
        ([tensor("w", np.ones(1), shape=(1,) * 70)], ("init tensor 'w': rank 70 exceeds 32",)),
        ([], ("init: at least one tensor is required",)),
    ],
    ids=["nan", "repeated name", "negative dim", "zero beside a huge dim", "rank 70", "empty"],
)
def test_a_bad_init_leaves_a_fresh_ps_uninitialized(
    make_ps: Callable[..., DensePS], tensors: list[pb.Tensor], fragments: tuple[str, ...]
) -> None:
    ps = make_ps()

    with pytest.raises(grpc.RpcError) as info:
        ps.stub.Init(pb.InitRequest(tensors=tensors), timeout=10)

    assert info.value.code() == INVALID
    for fragment in fragments:
        assert fragment in info.value.details()
    assert ps.client.stats().version == 0
    assert ps.client.init(initial())[0] == 1  # still serving, and adopts the next good init


class _RepeatingDensePS(pb_grpc.DensePSServicer):
    """A dense-PS that answers every Pull with one tensor twice."""

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> pb.PullResponse:  # noqa: N802
        return pb.PullResponse(version=1, tensors=[tensor("w", np.ones(2)), tensor("w", np.zeros(2))])


def test_the_client_refuses_an_answer_naming_a_tensor_twice() -> None:
    """The client decodes answers with the servicer's codec: a repeated name is refused, not
    silently resolved to whichever came last."""
    servicer = _RepeatingDensePS()
    server = build_server(ServerConfig(host="127.0.0.1", metrics_port=None),
                          [Service(SERVICE, lambda s: pb_grpc.add_DensePSServicer_to_server(servicer, s))])  # fmt: skip
    with server, DensePSClient(server.address, timeout=10) as client:
        with pytest.raises(InvalidArgument, match="dense-PS answer's tensor 'w' appears more than once"):
            client.pull()


def test_pull_and_push_before_init_are_failed_preconditions(make_ps: Callable[..., DensePS]) -> None:
    ps = make_ps()

    for call in (ps.client.pull, lambda: ps.client.push({"w": np.ones(1, np.float32)})):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == PRECONDITION
        assert "not initialized" in info.value.details()
    stats = ps.client.stats()
    assert (stats.version, stats.num_tensors, stats.rejected_pushes) == (0, 0, 1)


# --------------------------------------------------------------------------- the CLI


def _run(tmp_path: Path, config: str, port: int) -> Command:
    path = tmp_path / "model.yaml"
    path.write_text(config)
    command = [MONOLITH, "dense-ps", "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", "0"]  # fmt: skip
    return Command(command, tmp_path)


def test_cli_serves_with_the_configured_optimizer_then_exits_0_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = "features:\n  - name: user\nmodel:\n  hidden_units: [64, 32]\n  optimizer: {kind: sgd, learning_rate: 0.5}\n"
    with _run(tmp_path, config, port) as proc:
        wait_healthy(f"127.0.0.1:{port}", timeout=30, service=SERVICE)
        with DensePSClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.init({"w": np.ones(2, np.float32)})
            version = client.push({"w": np.ones(2, np.float32)})
            _, tensors = client.pull()
            stats = client.stats()
        exited = proc.stop(timeout=15)  # SIGTERM; a SIGKILL after 15 s would exit with -9

    assert version == 2
    assert_tensors(tensors, {"w": np.full(2, 0.5, np.float32)})
    assert stats.optimizer == "sgd"
    assert exited.code == 0, exited.stderr
    assert "received SIGTERM" in exited.stderr


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("model: {optimizer: {kind: rmsprop}}\n", "model.optimizer.kind: input should be 'sgd', 'adagrad' or 'adam'"),
        ("model: {optimizer: {learning_rate: -1}}\n", "model.optimizer.learning_rate: input should be greater than 0"),
        ("model: {optimizer: {lr: 0.1}}\n", "model.optimizer.lr: unknown field"),
        ("model: [1]\n", "model: input should be a valid dictionary"),
        ("model: {\n", "not valid YAML"),
    ],
    ids=["unknown kind", "negative learning rate", "unknown key", "model not a mapping", "not yaml"],
)
def test_cli_with_a_bad_config_exits_2_naming_the_field(tmp_path: Path, config: str, message: str) -> None:
    exited = _run(tmp_path, "features: [{name: user}]\n" + config, free_port()).wait(timeout=15)

    assert exited.code == 2, exited.stderr
    assert message in exited.stderr
    assert exited.stderr.strip().startswith("monolith dense-ps: invalid config:")
