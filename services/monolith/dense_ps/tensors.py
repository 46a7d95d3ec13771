"""The codec of the dense-PS's `Tensor` messages: float32 arrays by name, both ways.

The servicer decodes what trainers push and the client decodes what the dense-PS answers,
with the same checks: shapes numpy can hold, bytes that fit them, and each name once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from monolith.api.dense_ps.v1 import dense_ps_pb2 as pb
from monolith.common.errors import InvalidArgument, shorten
from monolith.common.wire import decode_array, encode_array


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    """Tensor messages, in the mapping's order (values as little-endian float32)."""
    return [pb.Tensor(name=n, shape=np.shape(t), values=encode_array(t, "<f4")) for n, t in tensors.items()]


def decode_tensors(messages: Iterable[pb.Tensor], what: str) -> dict[str, np.ndarray]:
    """Read-only float32 arrays by name, after checking ranks, sizes and unique names.

    `decode_array` checks the shape (rank, signs, an empty shape numpy could not hold) and
    compares the byte length with it in Python integers, so an absurd shape fails there
    instead of allocating anything.

    Args:
        messages: the tensors as received.
        what: names them in errors, e.g. "gradient" or "pulled tensor".

    Raises:
        InvalidArgument: a repeated name, a shape `check_shape` refuses, or bytes that do
            not fit the shape.
    """
    out: dict[str, np.ndarray] = {}
    for t in messages:
        name = t.name
        if name in out:
            raise InvalidArgument(f"{what} {shorten(name)!r} appears more than once")
        out[name] = decode_array(t.values, "<f4", tuple(t.shape), f"{what} {shorten(name)!r}")
    return out
