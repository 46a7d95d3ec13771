"""The client's errors: a failed call carries its gRPC status and the server's message."""

from __future__ import annotations

import grpc


class MonolithClientError(RuntimeError):
    """A call failed; `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class PredictError(MonolithClientError):
    """A Predict (or GetModelMetadata) call failed (the message is the server's details)."""


class ActionError(MonolithClientError):
    """A ReportActions call failed; none of its actions is stored (the joiner takes all or none)."""
