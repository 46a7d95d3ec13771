"""A bare gRPC echo server: the transport-only baseline for PS lookups.

It answers each call with a payload of the size the caller asks for, so a benchmark can
move exactly the bytes a real lookup moves, with no work behind them.
Request: 8-byte little-endian response size, then any padding. Response: that many bytes.
"""

from __future__ import annotations

import argparse
import sys
from concurrent import futures

import grpc

from monolith.common.server import tune_gc

METHOD = "/monolith.bench.Echo/Echo"
_identity = lambda b: b  # noqa: E731 - raw bytes in and out, no protobuf


def serve(host: str, port: int) -> None:
    cache: dict[int, bytes] = {}

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        size = int.from_bytes(request[:8], "little")
        payload = cache.get(size)
        if payload is None:
            payload = cache.setdefault(size, bytes(size))
        return payload

    handler = grpc.method_handlers_generic_handler(
        "monolith.bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo, _identity, _identity)},
    )
    options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[handler], options=options)
    bound = server.add_insecure_port(f"{host}:{port}")
    tune_gc()  # the embedding-PS's garbage-collector settings, so only the work differs
    server.start()
    print(bound, flush=True)
    server.wait_for_termination()


def stub(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """The echo method on a channel."""
    return channel.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    a = parser.parse_args()
    serve(a.host, a.port)
    sys.exit(0)
