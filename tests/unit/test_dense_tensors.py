"""The dense-PS tensor codec: round trips, and the checks both the servicer and the client rely on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from monolith.api.dense_ps.v1 import dense_ps_pb2 as pb
from monolith.common.errors import InvalidArgument
from monolith.dense_ps.tensors import decode_tensors, encode_tensors


def _wire(messages: list[pb.Tensor]) -> list[pb.Tensor]:
    """The messages as the other side parses them."""
    return [pb.Tensor.FromString(m.SerializeToString()) for m in messages]


def test_round_trip_keeps_names_order_shapes_and_scalars() -> None:
    tensors = {"dense/kernel": np.arange(12, dtype=np.float32).reshape(4, 3), "out/scale": np.float32(2.5),
               "empty": np.zeros((0, 3), np.float32), "from a list": [1.0, 2.0]}  # fmt: skip

    decoded = decode_tensors(_wire(encode_tensors(tensors)), "tensor")

    assert list(decoded) == list(tensors)
    for name, value in tensors.items():
        assert decoded[name].dtype == np.float32 and decoded[name].shape == np.shape(value)
        np.testing.assert_array_equal(decoded[name], value)


_SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@given(st.dictionaries(st.text(max_size=8), hnp.arrays(np.float32, _SHAPES), max_size=4))
def test_encode_then_decode_is_the_identity(tensors: dict[str, np.ndarray]) -> None:
    decoded = decode_tensors(_wire(encode_tensors(tensors)), "tensor")

    assert list(decoded) == list(tensors)
    for name, value in tensors.items():
        assert decoded[name].shape == value.shape
        np.testing.assert_array_equal(decoded[name], value)


def test_a_repeated_name_is_refused() -> None:
    messages = encode_tensors({"w": np.ones(2)}) * 2

    with pytest.raises(InvalidArgument, match="pulled tensor 'w' appears more than once"):
        decode_tensors(messages, "pulled tensor")


def test_bytes_that_do_not_fit_the_shape_are_refused() -> None:
    (message,) = encode_tensors({"w": np.ones((2, 3))})
    message.shape[:] = [3, 3]

    with pytest.raises(InvalidArgument, match="gradient 'w': expected 36 bytes for shape \\(3, 3\\).*got 24"):
        decode_tensors([message], "gradient")
