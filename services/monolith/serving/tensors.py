"""TensorProto <-> numpy for the Predict API, with TF Serving's validation messages.

Only what the API carries is supported: int64/int32 ids, string ids, float32 scores, and
double/float/int times for the inputs that are times (`event_time`). Numbers may come as
the typed repeated fields or as `tensor_content` bytes, as `tf.make_tensor_proto`
produces either; strings come in `string_val`.

Every tensor is checked before anything is allocated for it: its dtype, rank and shape,
and the request's element and string-byte budget (`RequestLimits`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from monolith.common.errors import InvalidArgument, shorten
from monolith.common.wire import MAX_RANK
from monolith.serving.limits import NO_DEADLINE, Deadline, RequestLimits

_INT_TYPES = {types_pb2.DT_INT64: ("<i8", "int64_val"), types_pb2.DT_INT32: ("<i4", "int_val")}
_FLOAT_TYPES = {types_pb2.DT_DOUBLE: ("<f8", "double_val"), types_pb2.DT_FLOAT: ("<f4", "float_val")}
MAX_ELEMENTS = RequestLimits().max_elements


def dtype_name(dtype: int) -> str:
    """The DataType's name, also for a number the enum does not define."""
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"unknown DataType {dtype}"


def shape_of(tensor: tensor_pb2.TensorProto, name: str, max_elements: int = MAX_ELEMENTS) -> tuple[int, ...]:
    """The declared shape, checked: known, of sane rank, non-negative, of at most `max_elements`.

    A zero dimension does not excuse the others: numpy cannot hold [0, 2**62] either.
    """
    proto_shape = tensor.tensor_shape
    if proto_shape.unknown_rank:
        raise InvalidArgument(f"input {shorten(name)!r}: shape must be known")
    dims = proto_shape.dim
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"input {shorten(name)!r}: rank {len(dims)} exceeds {MAX_RANK}")
    shape = tuple([d.size for d in dims])
    if shape and min(shape) < 0:
        raise InvalidArgument(f"input {shorten(name)!r}: negative dimension in shape {list(shape)}")
    size = math.prod(shape)
    if size > max_elements:
        raise InvalidArgument(f"input {shorten(name)!r}: {size} elements; at most {max_elements} are accepted")
    # Only an empty shape can hide huge dimensions: otherwise the product is `size`.
    if size == 0 and math.prod(max(d, 1) for d in shape) > max_elements:
        raise InvalidArgument(
            f"input {shorten(name)!r}: shape {list(shape)} is too large; its dimensions may multiply to at "
            f"most {max_elements}"
        )
    return shape


def to_numpy(
    tensor: tensor_pb2.TensorProto, name: str, max_elements: int = MAX_ELEMENTS,
    max_string_bytes: int = RequestLimits().max_string_bytes,
) -> np.ndarray:  # fmt: skip
    """Int tensors as int64 arrays, string tensors as object arrays of str.

    Args:
        tensor: one input tensor.
        name: its input name, for messages.
        max_elements: elements its shape may declare.
        max_string_bytes: bytes its string values may hold.

    Raises:
        InvalidArgument: an unsupported dtype, a bad shape, too many elements or string
            bytes, tensor_content of the wrong length or on a string tensor, or values
            that do not fill the shape.
    """
    return _decode(tensor, name, shape_of(tensor, name, max_elements), max_string_bytes)


def _decode(
    tensor: tensor_pb2.TensorProto, name: str, shape: tuple[int, ...], max_string_bytes: int,
    strings: list[bytes] | None = None, numeric: bool = False,
) -> np.ndarray:  # fmt: skip
    """`to_numpy` for a tensor whose shape is already checked.

    Args:
        strings: the string values if the caller has them already: each access to
            `string_val` builds new bytes objects, so they are read out once.
        numeric: the input is a number (a time), not an id: double, float and int tensors
            are accepted and returned as float64; strings are refused.
    """
    size = math.prod(shape)
    what = f"input {shorten(name)!r}"
    if numeric and tensor.dtype not in _INT_TYPES and tensor.dtype not in _FLOAT_TYPES:
        raise InvalidArgument(f"{what}: expects a double, float or int64 tensor, got {dtype_name(tensor.dtype)}")
    if not numeric and tensor.dtype in _FLOAT_TYPES:
        raise InvalidArgument(f"{what}: expects an int64, int32 or string tensor, got {dtype_name(tensor.dtype)}")
    if tensor.dtype in _INT_TYPES or tensor.dtype in _FLOAT_TYPES:
        dtype, field = _INT_TYPES.get(tensor.dtype) or _FLOAT_TYPES[tensor.dtype]
        if tensor.tensor_content:
            expected = size * np.dtype(dtype).itemsize
            if len(tensor.tensor_content) != expected:
                raise InvalidArgument(
                    f"{what}: tensor_content has {len(tensor.tensor_content)} bytes; shape "
                    f"{list(shape)} of {dtype_name(tensor.dtype)} needs {expected}"
                )
            values = np.frombuffer(tensor.tensor_content, dtype=dtype)
        else:
            typed = getattr(tensor, field)
            if len(typed) > max(size, 1):
                raise InvalidArgument(f"{what}: {len(typed)} values do not fill shape {list(shape)} ({size} elements)")
            values = np.asarray(typed, dtype=np.dtype(dtype).newbyteorder("="))
    elif tensor.dtype == types_pb2.DT_STRING:
        if tensor.tensor_content:
            raise InvalidArgument(
                f"{what}: a DT_STRING tensor carries its values in string_val; tensor_content is not read for "
                "strings, so it must be empty"
            )
        count = len(tensor.string_val)
        if count > max(size, 1):
            raise InvalidArgument(f"{what}: {count} values do not fill shape {list(shape)} ({size} elements)")
        if strings is None:
            strings = list(tensor.string_val)
        total = sum(map(len, strings))
        if total > max_string_bytes:
            raise InvalidArgument(f"{what}: {total} bytes of strings; at most {max_string_bytes} are accepted")
        try:
            values = np.fromiter(map(bytes.decode, strings), dtype=object, count=count)
        except UnicodeDecodeError:
            raise InvalidArgument(f"{what}: string values must be UTF-8") from None
    else:
        raise InvalidArgument(f"{what}: expects an int64, int32 or string tensor, got {dtype_name(tensor.dtype)}")
    if values.shape[0] == 1 and size > 1:
        values = np.repeat(values, size)  # TF's convention: one value fills the tensor
    if values.shape[0] != size:
        raise InvalidArgument(f"{what}: {values.shape[0]} values do not fill shape {list(shape)} ({size} elements)")
    if numeric:
        return values.astype(np.float64).reshape(shape)
    return values.astype(np.int64).reshape(shape) if values.dtype != object else values.reshape(shape)


def decode_inputs(
    tensors: Mapping[str, tensor_pb2.TensorProto], limits: RequestLimits, deadline: Deadline = NO_DEADLINE,
    numeric: Collection[str] = (),
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every input tensor as an array, within the request's budget of elements and string bytes.

    The budget is checked over all tensors from their shapes and byte counts before any
    is decoded, so an oversized request costs no decoding at all.

    Args:
        tensors: the request's inputs by name.
        limits: the request's budget.
        deadline: checked between tensors.
        numeric: names of inputs that are numbers (times), decoded as float64 from a
            double, float or int tensor; every other input is an id (int or string).

    Raises:
        InvalidArgument: a tensor `to_numpy` refuses, or the tensors together exceed the limits.
        DeadlineExceeded: the deadline passed between two tensors.
    """
    elements = 0
    string_bytes = 0
    checked = []
    for name, tensor in tensors.items():
        shape = shape_of(tensor, name, limits.max_elements)
        elements += math.prod(shape)
        strings = None
        if tensor.dtype == types_pb2.DT_STRING and len(tensor.string_val) <= limits.max_elements:
            strings = list(tensor.string_val)
            string_bytes += sum(map(len, strings))
        checked.append((name, tensor, shape, strings))
    if elements > limits.max_elements:
        raise InvalidArgument(
            f"the inputs hold {elements} elements together; at most {limits.max_elements} are accepted per request"
        )
    if string_bytes > limits.max_string_bytes:
        raise InvalidArgument(
            f"the inputs hold {string_bytes} bytes of strings together; at most {limits.max_string_bytes} are "
            "accepted per request"
        )
    out = {}
    for name, tensor, shape, strings in checked:
        if deadline.at is not None:
            deadline.check(f"while decoding input {shorten(name)!r}")
        out[name] = _decode(tensor, name, shape, limits.max_string_bytes, strings, numeric=name in numeric)
    return out


def float_tensor(values: np.ndarray) -> tensor_pb2.TensorProto:
    """A DT_FLOAT TensorProto with the values as tensor_content."""
    values = np.ascontiguousarray(values, dtype="<f4")
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in values.shape]
        ),
        tensor_content=values.tobytes(),
    )
