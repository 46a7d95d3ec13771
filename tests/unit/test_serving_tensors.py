"""TensorProto <-> numpy for the Predict API: what `to_numpy` accepts, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from monolith.common.errors import InvalidArgument
from monolith.serving.tensors import MAX_ELEMENTS, float_tensor, to_numpy


def proto(dtype: int, shape: list[int], **fields: object) -> tensor_pb2.TensorProto:
    """A TensorProto built field by field, for encodings `tf.make_tensor_proto` never produces."""
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims), **fields)


# ------------------------------------------------------------------ accepted


def test_int64_from_tensor_content() -> None:
    tensor = tf.make_tensor_proto(np.array([[1, -2], [3, 2**62]], np.int64))
    assert tensor.tensor_content  # the encoding under test

    array = to_numpy(tensor, "movie_id")

    assert array.dtype == np.int64 and array.shape == (2, 2)
    np.testing.assert_array_equal(array, [[1, -2], [3, 2**62]])


def test_int64_from_int64_val() -> None:
    array = to_numpy(proto(types_pb2.DT_INT64, [3], int64_val=[5, -6, 2**63 - 1]), "movie_id")

    assert array.dtype == np.int64
    np.testing.assert_array_equal(array, [5, -6, 2**63 - 1])


@pytest.mark.parametrize("encoding", ["tensor_content", "int_val"])
def test_int32_becomes_int64(encoding: str) -> None:
    if encoding == "tensor_content":
        tensor = tf.make_tensor_proto(np.array([7, -8, 2**31 - 1], np.int32))
        assert tensor.tensor_content
    else:
        tensor = proto(types_pb2.DT_INT32, [3], int_val=[7, -8, 2**31 - 1])

    array = to_numpy(tensor, "user_id")

    assert array.dtype == np.int64
    np.testing.assert_array_equal(array, [7, -8, 2**31 - 1])


def test_strings_become_an_object_array_of_str() -> None:
    tensor = tf.make_tensor_proto([["Comedy", ""], ["Crime", "Film-Noir"]], dtype=tf.string)

    array = to_numpy(tensor, "genres")

    assert array.dtype == object and array.shape == (2, 2)
    assert array.tolist() == [["Comedy", ""], ["Crime", "Film-Noir"]]
    assert all(type(v) is str for v in array.ravel())


def test_utf8_strings_are_decoded() -> None:
    array = to_numpy(tf.make_tensor_proto(["Zürich", "東京"]), "zip")

    assert array.tolist() == ["Zürich", "東京"]


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (proto(types_pb2.DT_INT64, [2, 3], int64_val=[7]), np.full((2, 3), 7)),
        (proto(types_pb2.DT_INT32, [4], int_val=[-1]), np.full(4, -1)),
        (proto(types_pb2.DT_STRING, [3], string_val=[b"M"]), np.array(["M", "M", "M"], object)),
    ],
    ids=["int64", "int32", "string"],
)
def test_a_single_value_fills_the_shape(tensor: tensor_pb2.TensorProto, expected: np.ndarray) -> None:
    # TF's convention (tf.make_tensor_proto(7, shape=[2, 3]) sends one int64_val).
    array = to_numpy(tensor, "x")

    assert array.shape == expected.shape
    np.testing.assert_array_equal(array, expected)


def test_make_tensor_proto_of_a_scalar_with_a_shape_fills_it() -> None:
    array = to_numpy(tf.make_tensor_proto(9, dtype=tf.int64, shape=[2, 3]), "movie_id")

    np.testing.assert_array_equal(array, np.full((2, 3), 9))


def test_an_empty_tensor_is_accepted_here_and_refused_by_the_model() -> None:
    array = to_numpy(proto(types_pb2.DT_INT64, [0]), "movie_id")

    assert array.shape == (0,) and array.dtype == np.int64


# ------------------------------------------------------------------ refused


def refusal(tensor: tensor_pb2.TensorProto, name: str = "movie_id") -> str:
    with pytest.raises(InvalidArgument) as info:
        to_numpy(tensor, name)
    return str(info.value)


def test_tensor_content_of_the_wrong_length() -> None:
    tensor = proto(types_pb2.DT_INT64, [3], tensor_content=np.arange(2, dtype="<i8").tobytes())

    message = refusal(tensor)

    assert "'movie_id'" in message
    assert "tensor_content has 16 bytes" in message and "[3]" in message and "DT_INT64 needs 24" in message


def test_int32_tensor_content_is_checked_against_4_bytes_per_value() -> None:
    # 12 bytes are three int32s but only one and a half int64s: the dtype decides.
    good = proto(types_pb2.DT_INT32, [3], tensor_content=np.arange(3, dtype="<i4").tobytes())
    bad = proto(types_pb2.DT_INT32, [2], tensor_content=np.arange(3, dtype="<i4").tobytes())

    np.testing.assert_array_equal(to_numpy(good, "x"), [0, 1, 2])
    assert "tensor_content has 12 bytes" in refusal(bad) and "DT_INT32 needs 8" in refusal(bad)


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (proto(types_pb2.DT_INT64, [4], int64_val=[1, 2]), "2 values do not fill shape [4] (4 elements)"),
        (proto(types_pb2.DT_INT64, [2, 2]), "0 values do not fill shape [2, 2] (4 elements)"),
        (proto(types_pb2.DT_STRING, [1], string_val=[b"a", b"b"]), "2 values do not fill shape [1] (1 elements)"),
        (proto(types_pb2.DT_INT32, [0], int_val=[1]), "1 values do not fill shape [0] (0 elements)"),
    ],
    ids=["too-few", "none", "too-many-strings", "values-for-empty"],
)
def test_values_that_do_not_fill_the_shape(tensor: tensor_pb2.TensorProto, expected: str) -> None:
    message = refusal(tensor)

    assert "'movie_id'" in message and expected in message


@pytest.mark.parametrize(
    "dtype", [types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_BOOL, types_pb2.DT_UINT8, types_pb2.DT_INVALID]
)
def test_unsupported_dtypes(dtype: int) -> None:
    message = refusal(proto(dtype, [1]))

    assert "'movie_id'" in message
    assert "expects an int64, int32 or string tensor" in message
    assert types_pb2.DataType.Name(dtype) in message


def test_a_float_tensor_from_make_tensor_proto_is_refused() -> None:
    assert "got DT_FLOAT" in refusal(tf.make_tensor_proto(np.array([1.0, 2.0], np.float32)))


def test_non_utf8_strings() -> None:
    message = refusal(proto(types_pb2.DT_STRING, [2], string_val=[b"ok", b"\xff\xfe"]), "zip")

    assert message == "input 'zip': string values must be UTF-8"


def test_unknown_rank() -> None:
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_INT64, tensor_shape=tensor_shape_pb2.TensorShapeProto(unknown_rank=True), int64_val=[1]
    )

    assert refusal(tensor) == "input 'movie_id': shape must be known"


@pytest.mark.parametrize("shape", [[-1], [2, -1], [-3, 0]])
def test_negative_dimensions(shape: list[int]) -> None:
    message = refusal(proto(types_pb2.DT_INT64, shape, int64_val=[1]))

    assert message == f"input 'movie_id': negative dimension in shape {shape}"


@pytest.mark.parametrize("shape", [[MAX_ELEMENTS + 1], [1 << 20, 1 << 20], [1 << 40, 1 << 40]])
def test_too_many_elements_are_refused_before_any_allocation(shape: list[int]) -> None:
    # One value would "fill" the shape: the element cap must come first.
    message = refusal(proto(types_pb2.DT_INT64, shape, int64_val=[1]))

    assert f"at most {MAX_ELEMENTS} are accepted" in message
    assert str(shape[0] * shape[1] if len(shape) == 2 else shape[0]) in message


def test_max_elements_itself_is_accepted() -> None:
    array = to_numpy(proto(types_pb2.DT_INT32, [MAX_ELEMENTS], int_val=[3]), "x")

    assert array.shape == (MAX_ELEMENTS,) and array[-1] == 3


# ------------------------------------------------------------------ float_tensor


@pytest.mark.parametrize(
    "values",
    [
        np.array([0.25, 0.5, 1e-30, 1.0], np.float32),
        np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], np.float32),
        np.zeros(0, np.float32),
        np.array([0.1, 0.7]),  # float64 in, float32 out
    ],
    ids=["1d", "2d", "empty", "float64"],
)
def test_float_tensor_round_trips_through_make_ndarray(values: np.ndarray) -> None:
    tensor = float_tensor(values)

    assert tensor.dtype == types_pb2.DT_FLOAT
    assert [d.size for d in tensor.tensor_shape.dim] == list(values.shape)
    assert len(tensor.tensor_content) == 4 * values.size
    back = tf.make_ndarray(tensor)
    assert back.dtype == np.float32 and back.shape == values.shape
    np.testing.assert_array_equal(back, values.astype(np.float32))
