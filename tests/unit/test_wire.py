"""Arrays on the wire: round trips and the checks that protect the server."""

from __future__ import annotations

import numpy as np
import pytest

from monolith.common.errors import InvalidArgument
from monolith.common.wire import decode_array, encode_array, require_finite


@pytest.mark.parametrize("dtype", ["<i8", "<f4", "<i4", "<u4"])
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 4), (2, 0, 7), (2, 3, 4)])
def test_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    array = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)

    data = encode_array(array, dtype)
    decoded = decode_array(data, dtype, shape, "values")

    assert len(data) == array.size * np.dtype(dtype).itemsize
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_encode_is_little_endian_and_contiguous() -> None:
    big_endian = np.array([[1, 2], [3, 4]], dtype=">i4")

    data = encode_array(big_endian.T, "<i4")

    assert data == np.array([1, 3, 2, 4], dtype="<i4").tobytes()
    assert data[:4] == b"\x01\x00\x00\x00"


def test_encode_converts_dtype() -> None:
    data = encode_array(np.array([1.5, -2.0]), "<f4")

    np.testing.assert_array_equal(decode_array(data, "<f4", (2,), "x"), [1.5, -2.0])


def test_decode_is_a_view_of_the_bytes() -> None:
    decoded = decode_array(b"\x00" * 16, "<f4", (2, 2), "x")

    assert not decoded.flags.writeable


def test_wrong_length_names_field_shape_and_sizes() -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_array(b"\x00" * 100, "<f4", (256, 4), "embeddings")

    assert info.value.code == "INVALID_ARGUMENT"
    assert str(info.value) == (
        "embeddings: expected 4096 bytes for shape (256, 4) of float32, got 100"
    )


def test_negative_dimension_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match=r"ids: negative size"):
        decode_array(b"", "<i8", (-1, 0), "ids")


@pytest.mark.parametrize("shape", [(2**62,), (2**62, 8), (2**40, 2**40, 2**40)])
def test_absurd_shape_fails_length_check_without_overflow(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidArgument, match=r"expected \d+ bytes"):
        decode_array(b"\x00" * 8, "<i8", shape, "ids")


def test_numpy_integer_shape_is_accepted() -> None:
    shape = tuple(np.array([2, 3], dtype=np.uint32))

    assert decode_array(b"\x00" * 24, "<f4", shape, "x").shape == (2, 3)


def test_require_finite_accepts_finite_values() -> None:
    require_finite(np.array([[0.0, -1e30], [1e-30, 3.0]], dtype="<f4"), "grads")
    require_finite(np.zeros((0, 4), dtype="<f4"), "grads")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_require_finite_counts_and_locates_bad_values(bad: float) -> None:
    array = np.zeros((3, 4), dtype="<f4")
    array[1, 2] = bad
    array[2, 0] = np.nan

    with pytest.raises(InvalidArgument) as info:
        require_finite(array, "grads")

    assert info.value.code == "INVALID_ARGUMENT"
    assert str(info.value).startswith("grads: 2 non-finite value(s)")
    assert "first at index (1, 2)" in str(info.value)
