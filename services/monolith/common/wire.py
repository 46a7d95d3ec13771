"""Arrays on the wire: little-endian bytes with an explicit dtype and shape.

`bytes` plus shape is ~25x cheaper to build from numpy than `repeated float`, and
`np.frombuffer` parses it without a copy. The price is that the server must check the
length itself, which `decode_array` does, raising INVALID_ARGUMENT on a mismatch.
"""

from __future__ import annotations

import math

import numpy as np

from monolith.common.errors import InvalidArgument

# numpy arrays have at most 64 dimensions; no tensor of ours comes near this.
MAX_RANK = 32
# numpy refuses ("array is too big") an empty shape whose other dimensions multiply past
# its limits, e.g. (0, 2**62); such a shape is refused here first. 2**40 elements is still
# far beyond any message. (A non-empty shape that large fails the length check instead.)
MAX_SPAN = 1 << 40
_DTYPES = {name: np.dtype(name) for name in ("<i8", "<i4", "<u4", "<f4")}


def check_shape(shape: tuple[int, ...] | list[int], what: str) -> tuple[int, ...]:
    """A declared shape as Python ints, after checking numpy could hold an array of it.

    Args:
        shape: One entry per dimension, as the client sent it.
        what: The field name, used in error messages.

    Returns:
        The shape as a tuple of Python ints.

    Raises:
        InvalidArgument: A rank above MAX_RANK, a negative dimension, or a zero dimension
            beside others whose product exceeds MAX_SPAN.
    """
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"{what}: rank {len(shape)} exceeds {MAX_RANK}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: negative size in shape {shape}")
    # Python ints, not numpy ones: a hostile shape like (2**62, 8) must not wrap around.
    if 0 in shape and math.prod(max(d, 1) for d in shape) > MAX_SPAN:
        raise InvalidArgument(f"{what}: shape {shape} is too large (dimensions multiply past 2**40)")
    return shape


def decode_array(data: bytes, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Views wire bytes as an array, after checking they fit the declared shape.

    Args:
        data: The raw bytes from the message.
        dtype: A little-endian numpy dtype string, e.g. '<f4' or '<i8'.
        shape: The shape the client declared, one entry per dimension.
        what: The field name, used in error messages.

    Returns:
        A read-only array of `shape` sharing memory with `data`.

    Raises:
        InvalidArgument: The shape fails `check_shape`, or `len(data)` is not
            `prod(shape) * itemsize`.
    """
    kind = _DTYPES.get(dtype) or np.dtype(dtype)
    # Most arrays are 1-D (ids, counts): a length that matches needs none of check_shape's
    # work, and any other 1-D case is refused below exactly as before. (int(): a numpy
    # size could wrap around when multiplied.)
    if len(shape) == 1 and 0 <= int(shape[0]) and len(data) == int(shape[0]) * kind.itemsize:
        return np.frombuffer(data, dtype=kind)
    shape = check_shape(shape, what)
    expected = math.prod(shape) * kind.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{what}: expected {expected} bytes for shape {shape} of {kind.name}, "
            f"got {len(data)}"
        )
    return np.frombuffer(data, dtype=kind).reshape(shape)


def encode_array(array: np.ndarray, dtype: str) -> bytes:
    """Serializes an array as contiguous bytes of `dtype` (converting if needed).

    Args:
        array: Any array-like; its shape travels separately.
        dtype: A little-endian numpy dtype string, e.g. '<f4' or '<i8'.

    Returns:
        The raw bytes, `array.size * itemsize` long.
    """
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def require_finite(array: np.ndarray, what: str) -> None:
    """Rejects arrays holding NaN or ±Inf, which would poison an embedding table.

    Args:
        array: A floating-point array.
        what: The field name, used in the error message.

    Raises:
        InvalidArgument: Naming how many values are non-finite and where the first is.
    """
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidArgument(
            f"{what}: {int(bad.sum())} non-finite value(s) (NaN or Inf), first at index {first}"
        )
