"""TensorProto <-> numpy for the Predict API, with TF Serving's validation messages.

Only what the API carries is supported: int64/int32 ids, string ids, float32 scores.
Values may come as the typed repeated fields or as `tensor_content` bytes, as
`tf.make_tensor_proto` produces either.
"""

from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from monolith.common.errors import InvalidArgument

_INT_TYPES = {types_pb2.DT_INT64: ("<i8", "int64_val"), types_pb2.DT_INT32: ("<i4", "int_val")}
MAX_ELEMENTS = 1 << 22


def shape_of(tensor: tensor_pb2.TensorProto, name: str) -> tuple[int, ...]:
    """The declared shape, checked: known, non-negative, of sane size."""
    if tensor.tensor_shape.unknown_rank:
        raise InvalidArgument(f"input {name!r}: shape must be known")
    shape = tuple(int(d.size) for d in tensor.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: negative dimension in shape {list(shape)}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise InvalidArgument(f"input {name!r}: {math.prod(shape)} elements; at most {MAX_ELEMENTS} are accepted")
    return shape


def to_numpy(tensor: tensor_pb2.TensorProto, name: str) -> np.ndarray:
    """Int tensors as int64 arrays, string tensors as object arrays of str.

    Raises:
        InvalidArgument: an unsupported dtype, or values that do not fill the shape.
    """
    shape = shape_of(tensor, name)
    size = math.prod(shape)
    if tensor.dtype in _INT_TYPES:
        dtype, field = _INT_TYPES[tensor.dtype]
        if tensor.tensor_content:
            expected = size * np.dtype(dtype).itemsize
            if len(tensor.tensor_content) != expected:
                raise InvalidArgument(
                    f"input {name!r}: tensor_content has {len(tensor.tensor_content)} bytes; shape "
                    f"{list(shape)} of {types_pb2.DataType.Name(tensor.dtype)} needs {expected}"
                )
            values = np.frombuffer(tensor.tensor_content, dtype=dtype)
        else:
            values = np.asarray(getattr(tensor, field), dtype=np.int64)
    elif tensor.dtype == types_pb2.DT_STRING:
        try:
            values = np.array([v.decode("utf-8") for v in tensor.string_val], dtype=object)
        except UnicodeDecodeError:
            raise InvalidArgument(f"input {name!r}: string values must be UTF-8") from None
    else:
        raise InvalidArgument(
            f"input {name!r}: expects an int64, int32 or string tensor, got {types_pb2.DataType.Name(tensor.dtype)}"
        )
    if values.shape[0] == 1 and size > 1:
        values = np.repeat(values, size)  # TF's convention: one value fills the tensor
    if values.shape[0] != size:
        raise InvalidArgument(
            f"input {name!r}: {values.shape[0]} values do not fill shape {list(shape)} ({size} elements)"
        )
    return values.astype(np.int64).reshape(shape) if values.dtype != object else values.reshape(shape)


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
