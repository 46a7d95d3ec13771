"""The one place where handler exceptions become gRPC statuses and RPCs are counted.

Handlers raise `MonolithError` subclasses (or let bugs escape); this interceptor turns
them into `context.abort(code, message)` and records go-grpc-prometheus metrics with the
final status code, for all four handler kinds. It also parses requests on the handler's
side, so bytes that do not parse are INVALID_ARGUMENT like any other bad request, and
it bounds every status message to fit gRPC's metadata limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from monolith.common import metrics
from monolith.common.errors import InvalidArgument, MonolithError, bounded_details

_LOGGER = logging.getLogger("monolith.grpc")

_OK = grpc.StatusCode.OK


class _MethodSeries:
    """One method's metric series, looked up once: `labels()` takes a lock and builds a key."""

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self._labels = labels
        self.started = metrics.grpc_server_started_total.labels(*labels)
        self.seconds = metrics.grpc_server_handling_seconds.labels(*labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        series = self._handled.get(code)
        if series is None:
            series = self._handled[code] = metrics.grpc_server_handled_total.labels(*self._labels, code.name)
        return series


class _Call:
    """Metrics for one RPC: counted as started on creation, as handled on `finish`."""

    def __init__(self, series: _MethodSeries) -> None:
        self._series = series
        self._started = time.perf_counter()
        series.started.inc()

    def finish(self, code: grpc.StatusCode) -> None:
        self._series.handled(code).inc()
        self._series.seconds.observe(time.perf_counter() - self._started)


def _final_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status of an RPC whose handler returned normally (it may have set a code)."""
    if context.code() is not None:
        return context.code()
    # A stream that ended because the client went away did not succeed.
    return _OK if context.is_active() else grpc.StatusCode.CANCELLED


def _status_of(
    exc: Exception, context: grpc.ServicerContext, method: str
) -> tuple[grpc.StatusCode, str | None]:
    """Decides the status for an exception that escaped a handler.

    Returns:
        The code, and the details to abort with; None details mean the status is already
        settled and the exception should propagate unchanged.
    """
    code = context.code()
    # grpc's context.abort() records the status and then raises a bare Exception(); it is
    # the handler choosing its status, not a bug, so it passes through untouched.
    if type(exc) is Exception and not exc.args and code not in (None, _OK):
        return code, None
    # The generated servicer base classes set UNIMPLEMENTED and then raise
    # NotImplementedError for methods a service does not offer: keep their status.
    if isinstance(exc, NotImplementedError) and code == grpc.StatusCode.UNIMPLEMENTED:
        return code, context.details() or "Method not implemented!"
    # The client cancelled or the deadline passed, so reading the request stream failed;
    # nobody is listening for a status.
    if not context.is_active():
        return grpc.StatusCode.CANCELLED, None
    if isinstance(exc, MonolithError):
        return grpc.StatusCode[exc.code], bounded_details(str(exc))
    _LOGGER.error("unexpected error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, bounded_details(f"internal error: {type(exc).__name__}: {exc}")


class _Undecodable:
    """Stands in for a request message whose bytes did not parse (see `_lenient`)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The request deserializer, made never to raise.

    If a deserializer raises, gRPC itself answers INTERNAL "Exception deserializing
    request!". Worse, in a request stream it then still runs the handler, which sees the
    stream end and returns, and gRPC sends a second status that never completes: the call
    stays open and `server.stop()` waits for it forever. So the failure is handed to the
    handler's wrapper as an `_Undecodable`, which raises INVALID_ARGUMENT there.
    """
    if deserializer is None:
        return None
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "the request message"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bad bytes
            return _Undecodable(f"request bytes do not parse as {name} ({exc})")

    return deserialize


def _parsed(request: Any, streaming: bool) -> Any:
    """The request (or request stream) with undecodable messages raising INVALID_ARGUMENT."""
    if not streaming:
        if isinstance(request, _Undecodable):
            raise InvalidArgument(request.message)
        return request

    def stream() -> Iterator[Any]:
        for message in request:
            if isinstance(message, _Undecodable):
                raise InvalidArgument(message.message)
            yield message

    return stream()


def _wrap_unary_response(
    behavior: Callable[[Any, grpc.ServicerContext], Any],
    series: _MethodSeries,
    method: str,
    request_streaming: bool,
) -> Callable[[Any, grpc.ServicerContext], Any]:
    """Wraps a unary-unary or stream-unary handler."""

    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        call = _Call(series)
        try:
            response = behavior(_parsed(request, request_streaming), context)
        except Exception as exc:
            code, details = _status_of(exc, context, method)
            call.finish(code)
            if details is None:
                raise
            context.abort(code, details)
        call.finish(_final_code(context))
        return response

    return handle


def _wrap_stream_response(
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
    series: _MethodSeries,
    method: str,
    request_streaming: bool,
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    """Wraps a unary-stream or stream-stream handler, including errors mid-stream."""

    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = _Call(series)
        try:
            # Inside the generator, so an error at call time and one on the hundredth
            # response are mapped alike.
            yield from behavior(_parsed(request, request_streaming), context)
        except GeneratorExit:
            call.finish(grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:
            code, details = _status_of(exc, context, method)
            call.finish(code)
            if details is None:
                raise
            context.abort(code, details)
        else:
            call.finish(_final_code(context))

    return handle


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _split_method(full_method: str) -> tuple[str, str]:
    """Splits "/pkg.Service/Method" into ("pkg.Service", "Method")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class ErrorAndMetricsInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to statuses and records RPC metrics for every handler kind.

    A `MonolithError` becomes its own code and message. Any other exception is logged
    with its traceback on "monolith.grpc" and becomes INTERNAL. A status the handler set
    itself (`context.abort`, `context.set_code`) is kept. Request bytes that do not parse
    are INVALID_ARGUMENT. Messages are cut to `MAX_DETAILS_CHARS`, so an echoed client
    value cannot push the status past gRPC's metadata limit. Every RPC is counted in
    `grpc_server_started_total`, `grpc_server_handled_total` (with the final code) and
    `grpc_server_handling_seconds`.
    """

    def __init__(self) -> None:
        # Wrapped handlers by method, each with the handler it wraps: gRPC asks for every
        # call, and wrapping anew (closures, codecs, metric lookups) cost as much as a
        # third of an echo call's server CPU.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:  # Unknown method: grpc answers UNIMPLEMENTED itself.
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary or handler.unary_stream
        behavior = behavior or handler.stream_unary or handler.stream_stream
        # Non-blocking handlers answer through a callback after returning, so a wrapper
        # could neither see their errors nor time them; and grpc only honours the flag
        # on the original function.
        if getattr(behavior, "experimental_non_blocking", False):
            return handler

        series = _MethodSeries((_rpc_type(handler), *_split_method(method)))
        codecs = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            wrapped = _wrap_unary_response(handler.unary_unary, series, method, False)
            return grpc.unary_unary_rpc_method_handler(wrapped, **codecs)
        if handler.unary_stream:
            wrapped = _wrap_stream_response(handler.unary_stream, series, method, False)
            return grpc.unary_stream_rpc_method_handler(wrapped, **codecs)
        if handler.stream_unary:
            wrapped = _wrap_unary_response(handler.stream_unary, series, method, True)
            return grpc.stream_unary_rpc_method_handler(wrapped, **codecs)
        wrapped = _wrap_stream_response(handler.stream_stream, series, method, True)
        return grpc.stream_stream_rpc_method_handler(wrapped, **codecs)
