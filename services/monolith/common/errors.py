"""Exceptions that know their gRPC status code, by name: this module imports no gRPC.

Cores (the table engine, the model, configs) raise these without depending on gRPC; `ErrorAndMetricsInterceptor` turns them into `context.abort(code,
str(exc))` in one place, so servicers never catch exceptions themselves.
"""

from __future__ import annotations

MAX_ECHO_CHARS = 200  # a client's value echoed in a message is cut to this length


def shorten(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, marked as cut: for echoing client values in errors.

    gRPC sends a status message in a header, and an unbounded echo of a client's string
    would exceed the header limit and turn a clear INVALID_ARGUMENT into a lost stream.
    """
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range; names the field path."""


class MonolithError(Exception):
    """Base of all errors with a gRPC status; the message is `str(exc)`.

    Attributes:
        code: The name of the gRPC status the client sees (a `grpc.StatusCode` member's
            name, so that cores need not import gRPC). INTERNAL unless a subclass says otherwise.
    """

    code: str = "INTERNAL"


class InvalidArgument(MonolithError):
    """The request is malformed, whatever the server's state."""

    code = "INVALID_ARGUMENT"


class NotFound(MonolithError):
    """A named entity (table, row, checkpoint) does not exist."""

    code = "NOT_FOUND"


class FailedPrecondition(MonolithError):
    """The server is not in a state to do this (e.g. no shard id assigned yet)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(MonolithError):
    """A capacity limit was hit (table full, too many rows in one request)."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(MonolithError):
    """A transient failure; the client may retry."""

    code = "UNAVAILABLE"


class AlreadyExists(MonolithError):
    """The entity the client tried to create is already there."""

    code = "ALREADY_EXISTS"


class OutOfRange(MonolithError):
    """A valid kind of value outside the range the server accepts (e.g. a shard index)."""

    code = "OUT_OF_RANGE"


class DeadlineExceeded(MonolithError):
    """The client's deadline passed before the work was done; the rest was abandoned."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(MonolithError):
    """The client cancelled the call; nobody reads the answer."""

    code = "CANCELLED"


_BY_CODE = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable, AlreadyExists, OutOfRange)
}


def from_rpc_error(exc: Exception, what: str) -> MonolithError:
    """An error of ours for a failed call to another service (a grpc.RpcError), keeping its status.

    A deadline or a lost connection becomes UNAVAILABLE (the caller may retry); other
    codes keep their class; the message names the peer (`what`) and its details.
    """
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"  # type: ignore[attr-defined]
    details = exc.details() if hasattr(exc, "details") else str(exc)  # type: ignore[attr-defined]
    if code in ("DEADLINE_EXCEEDED", "CANCELLED"):
        code = "UNAVAILABLE"
    return _BY_CODE.get(code, MonolithError)(f"{what}: {code}: {details}")


# Status details travel in a trailer, percent-encoded (up to 12 bytes per character);
# past the client's 8 KiB metadata limit the client sees RESOURCE_EXHAUSTED "Stream
# removed" instead of the status. 512 characters stay within it whatever they are.
MAX_DETAILS_CHARS = 512


def bounded_details(message: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """A status message cut to `limit` characters, keeping its start and its end.

    Both ends, because the start names the field and the end often says what is allowed
    ("...; this shard has: user, item").
    """
    if len(message) <= limit:
        return message
    cut = f" ...[{len(message) - limit} chars cut]... "
    head = (limit - len(cut)) * 2 // 3
    tail = limit - len(cut) - head
    return f"{message[:head]}{cut}{message[-tail:]}"


def describe(exc: BaseException, what: str = "") -> str:
    """One line for a log or a status message: `KIND: [what: ]message`, the kind first.

    The kind is the gRPC status name of a failed call (a `grpc.RpcError`, recognized by its
    `code()` without importing gRPC), the status of one of our errors, or the exception's
    class, so a caller that logs once per kind of outage can compare the text before the
    first colon.

    Args:
        exc: what went wrong.
        what: the peer or the step it happened in, e.g. "dense-PS" or "NATS (ack)".
    """
    code = getattr(exc, "code", None)
    if callable(code):  # a grpc.RpcError: code() is its status, details() its message
        kind = getattr(code(), "name", "UNKNOWN")
        details = getattr(exc, "details", None)
        message = (details() if callable(details) else "") or ""
    elif isinstance(exc, MonolithError):
        kind, message = exc.code, str(exc)
    else:
        kind, message = type(exc).__name__, str(exc)
    message = " ".join(message.split())
    parts = [kind, *([what] if what else []), *([message] if message else [])]
    return ": ".join(parts)
