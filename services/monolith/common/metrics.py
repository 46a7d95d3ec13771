"""Prometheus metrics for gRPC servers and the HTTP endpoint that exposes them.

Names and labels follow go-grpc-prometheus, so stock Grafana dashboards and alerts work.
The metrics are module globals on the default registry: a registry refuses a second
metric of the same name, and a test process starts many servers.
"""

from __future__ import annotations

from typing import Any

import prometheus_client

_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# The default buckets start at 5 ms; a PS lookup is often well under 1 ms.
HANDLING_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

grpc_server_started_total = prometheus_client.Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    _RPC_LABELS,
)
grpc_server_handled_total = prometheus_client.Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status.",
    (*_RPC_LABELS, "grpc_code"),
)
grpc_server_handling_seconds = prometheus_client.Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC's handler to its last response.",
    _RPC_LABELS,
    buckets=HANDLING_SECONDS_BUCKETS,
)


def start_metrics_http(host: str, port: int) -> tuple[Any, int]:
    """Serves /metrics from the default registry on a daemon thread.

    Args:
        host: Interface to bind, e.g. "127.0.0.1" or "0.0.0.0".
        port: TCP port; 0 picks a free one.

    Returns:
        The HTTP server (pass it to `stop_metrics_http`) and the port it bound.
    """
    httpd, _thread = prometheus_client.start_http_server(port, addr=host)
    return httpd, int(httpd.server_address[1])


def stop_metrics_http(httpd: Any) -> None:
    """Stops a server from `start_metrics_http` and releases its port."""
    httpd.shutdown()
    httpd.server_close()
