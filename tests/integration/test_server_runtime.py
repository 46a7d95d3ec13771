"""A real server from build_server: status mapping, health, reflection, metrics, limits."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from helpers.metrics import metrics_url, read_metrics
from helpers.processes import Command
from monolith.common.errors import InvalidArgument, Unavailable
from monolith.common.process import wait_healthy
from monolith.common.server import MonolithServer, Service, ServerConfig, build_server

SERVICE = "monolith.test.v1.Probe"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_entered, _release = threading.Event(), threading.Event()


def _raw(data: bytes) -> bytes:
    return data


def _invalid(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise InvalidArgument("bad input")


def _crash(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise ValueError("boom")


def _abort(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such row")


def _set_code(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
    context.set_details("not ready")
    return b""


def _block(request: bytes, context: grpc.ServicerContext) -> bytes:
    _entered.set()
    _release.wait(timeout=10)
    return b"done"


def _count_then_fail(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"0"
    yield b"1"
    if request == b"monolith":
        raise Unavailable("shard went away")
    raise RuntimeError("disk on fire")


def _register(server: grpc.Server) -> None:
    codecs = {"request_deserializer": _raw, "response_serializer": _raw}
    unary = {
        "Echo": lambda request, context: request,
        "Invalid": _invalid,
        "Crash": _crash,
        "Abort": _abort,
        "SetCode": _set_code,
        "Block": _block,
    }
    handlers = {name: grpc.unary_unary_rpc_method_handler(f, **codecs) for name, f in unary.items()}
    handlers["CountThenFail"] = grpc.unary_stream_rpc_method_handler(_count_then_fail, **codecs)
    handlers["Concat"] = grpc.stream_unary_rpc_method_handler(
        lambda requests, context: b"".join(requests), **codecs
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _build(**overrides: object) -> MonolithServer:
    config = ServerConfig(**{"max_message_bytes": 64 * 1024, "grace_seconds": 1.0, **overrides})
    return build_server(config, [Service(SERVICE, _register)])


@pytest.fixture(scope="module")
def server() -> Iterator[MonolithServer]:
    with _build() as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: MonolithServer) -> Iterator[grpc.Channel]:
    # The client accepts any size, so the server's own limit is what gets tested.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield ch


def _unary(channel: grpc.Channel, method: str, request: bytes = b"") -> bytes:
    return channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=10)


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.mark.parametrize(
    ("method", "code", "details", "logged"),
    [
        ("Invalid", grpc.StatusCode.INVALID_ARGUMENT, "bad input", False),
        ("Crash", grpc.StatusCode.INTERNAL, "internal error: ValueError: boom", True),
        ("Abort", grpc.StatusCode.NOT_FOUND, "no such row", False),
        ("SetCode", grpc.StatusCode.FAILED_PRECONDITION, "not ready", False),
    ],
)
def test_errors_become_statuses(
    channel: grpc.Channel,
    caplog: pytest.LogCaptureFixture,
    method: str,
    code: grpc.StatusCode,
    details: str,
    logged: bool,
) -> None:
    with caplog.at_level(logging.ERROR, logger="monolith.grpc"):
        with pytest.raises(grpc.RpcError) as info:
            _unary(channel, method)

    assert (info.value.code(), info.value.details()) == (code, details)
    errors = [r for r in caplog.records if r.name == "monolith.grpc"]
    assert bool(errors) == logged
    assert all(r.exc_info is not None for r in errors)
    assert _unary(channel, "Echo", b"still serving") == b"still serving"


@pytest.mark.parametrize(
    ("request_bytes", "code", "details"),
    [
        (b"monolith", grpc.StatusCode.UNAVAILABLE, "shard went away"),
        (b"plain", grpc.StatusCode.INTERNAL, "internal error: RuntimeError: disk on fire"),
    ],
)
def test_error_mid_stream_becomes_status(
    channel: grpc.Channel, request_bytes: bytes, code: grpc.StatusCode, details: str
) -> None:
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for response in channel.unary_stream(f"/{SERVICE}/CountThenFail")(request_bytes):
            received.append(response)

    assert received == [b"0", b"1"]
    assert (info.value.code(), info.value.details()) == (code, details)
    assert _unary(channel, "Echo", b"ok") == b"ok"


def test_client_stream(channel: grpc.Channel) -> None:
    concat = channel.stream_unary(f"/{SERVICE}/Concat")

    assert concat(iter([b"a", b"b", b"c"]), timeout=10) == b"abc"


def test_message_over_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    assert len(_unary(channel, "Echo", b"x" * 32 * 1024)) == 32 * 1024

    with pytest.raises(grpc.RpcError) as info:
        _unary(channel, "Echo", b"x" * 128 * 1024)

    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_follows_set_serving(server: MonolithServer, channel: grpc.Channel) -> None:
    assert _health(channel, "") == _health(channel, SERVICE) == SERVING
    server.set_serving(False)
    try:
        assert _health(channel, "") == _health(channel, SERVICE) == NOT_SERVING
    finally:
        server.set_serving(True)


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())

    assert {SERVICE, "grpc.health.v1.Health"} <= services
    assert "grpc.reflection.v1alpha.ServerReflection" in services


def test_metrics_endpoint_counts_by_code(server: MonolithServer, channel: grpc.Channel) -> None:
    _unary(channel, "Echo")
    for method in ("Invalid", "Crash", "Abort"):
        with pytest.raises(grpc.RpcError):
            _unary(channel, method)

    page = read_metrics(metrics_url(server.metrics_port), timeout=10)

    handled = "grpc_server_handled_total"
    for method, code in [
        ("Echo", "OK"),
        ("Invalid", "INVALID_ARGUMENT"),
        ("Crash", "INTERNAL"),
        ("Abort", "NOT_FOUND"),
    ]:
        labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": method}
        assert page.sum(handled, **labels, grpc_code=code) >= 1, method
        assert page.sum("grpc_server_started_total", **labels) >= 1, method
    assert page.sum("grpc_server_handling_seconds_count", grpc_method="Echo") >= 1
    # Sub-millisecond buckets exist: PS lookups live there.
    assert page.has("grpc_server_handling_seconds_bucket", grpc_method="Echo", le="0.0001")


def test_concurrency_limit_sheds_load() -> None:
    _entered.clear()
    _release.clear()
    with _build(max_concurrent_rpcs=1, metrics_port=None) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            first = ch.unary_unary(f"/{SERVICE}/Block").future(b"", timeout=10)
            assert _entered.wait(timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                _unary(ch, "Echo")
            _release.set()

            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert first.result() == b"done"


def test_health_goes_not_serving_when_stop_begins() -> None:
    srv = _build(metrics_port=None)
    with grpc.insecure_channel(srv.address) as ch:
        srv.start()
        stub = health_pb2_grpc.HealthStub(ch)
        watches = [
            stub.Watch(health_pb2.HealthCheckRequest(service=s), timeout=10) for s in ("", SERVICE)
        ]
        assert [next(w).status for w in watches] == [SERVING, SERVING]

        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 10.0})
        stopper.start()
        assert [next(w).status for w in watches] == [NOT_SERVING, NOT_SERVING]
        for watch in watches:  # Ends the in-flight RPCs, so the drain need not wait.
            watch.cancel()
        stopper.join(timeout=10)

        assert not stopper.is_alive()
        with pytest.raises(grpc.RpcError):
            _health(ch, "")
    srv.stop()  # Idempotent.


_SIGNAL_SCRIPT = """
from monolith.common.server import ServerConfig, build_server
server = build_server(ServerConfig(metrics_port=None, grace_seconds=1.0), [])
print(server.port, flush=True)
server.run_until_signal(on_shutdown=lambda: print("flushed", flush=True))
"""


def test_run_until_signal_drains_and_flushes_on_sigterm(tmp_path: Path) -> None:
    with Command([sys.executable, "-c", _SIGNAL_SCRIPT], tmp_path) as proc:
        port = int(proc.first_line(timeout=30))  # after its imports
        wait_healthy(f"127.0.0.1:{port}", timeout=10)  # Handlers are in place by then.
        exited = proc.stop(timeout=15)  # SIGTERM; a SIGKILL after 15 s would exit with -9

    assert exited.code == 0, exited.stderr
    assert exited.stdout.splitlines()[-1:] == ["flushed"]
