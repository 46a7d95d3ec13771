"""The RowChunk codec: encode→decode is the identity, and bytes that do not fit are refused."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.common.errors import InvalidArgument
from monolith.embedding.table import RowBatch
from monolith.embedding_ps.chunks import Chunk, decode_chunk, encode_chunk


def _chunk(rows: int = 3, width: int = 4, deleted: int = 2, **fields: object) -> Chunk:
    batch = RowBatch(
        np.arange(rows, dtype=np.int64) - 7,
        np.arange(rows * width, dtype=np.float32).reshape(rows, width) / 3,
        np.arange(rows, dtype=np.uint32) + 1_700_000_000,
    )
    return Chunk("item", batch, np.arange(deleted, dtype=np.int64) + 100, **fields)  # type: ignore[arg-type]


def assert_same(a: Chunk, b: Chunk) -> None:
    assert (a.table, a.version, a.incarnation, a.newest_update_time, a.includes_optimizer_state) == (
        b.table, b.version, b.incarnation, b.newest_update_time, b.includes_optimizer_state)  # fmt: skip
    for x, y in ((a.rows.ids, b.rows.ids), (a.rows.values, b.rows.values),
                 (a.rows.update_times, b.rows.update_times), (a.deleted_ids, b.deleted_ids)):  # fmt: skip
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_round_trip_keeps_every_field() -> None:
    chunk = _chunk(version=42, incarnation="ab" * 16, newest_update_time=1_700_000_002.0,
                   includes_optimizer_state=True)  # fmt: skip

    message = encode_chunk(chunk)
    decoded = decode_chunk(pb.RowChunk.FromString(message.SerializeToString()), "chunk")

    assert (message.num_rows, message.width, message.num_deleted) == (3, 4, 2)
    assert_same(decoded, chunk)
    assert not decoded.rows.values.flags.writeable  # a view of the message's bytes, not a copy


def test_a_chunk_of_deletions_only_keeps_its_width() -> None:
    decoded = decode_chunk(encode_chunk(_chunk(rows=0, width=8, deleted=5)), "chunk")

    assert decoded.rows.values.shape == (0, 8) and decoded.num_rows == 0 and decoded.num_deleted == 5


_ROWS = st.integers(0, 6)


@st.composite
def chunks(draw: st.DrawFn) -> Chunk:
    n, width, deleted = draw(_ROWS), draw(st.integers(1, 5)), draw(_ROWS)
    ids = hnp.arrays(np.int64, n, elements=st.integers(-(2**63), 2**63 - 1))
    values = hnp.arrays(np.float32, (n, width), elements=st.floats(width=32, allow_nan=False))
    times = hnp.arrays(np.uint32, n)
    return Chunk(
        table=draw(st.text(max_size=12)),
        rows=RowBatch(draw(ids), draw(values), draw(times)),
        deleted_ids=draw(hnp.arrays(np.int64, deleted)),
        version=draw(st.integers(0, 2**63 - 1)),
        incarnation=draw(st.text(alphabet="0123456789abcdef", max_size=32)),
        newest_update_time=float(draw(st.integers(0, 2**32 - 1))),
        includes_optimizer_state=draw(st.booleans()),
    )


@given(chunks())
def test_encode_then_decode_is_the_identity(chunk: Chunk) -> None:
    wire = encode_chunk(chunk).SerializeToString()

    assert_same(decode_chunk(pb.RowChunk.FromString(wire), "chunk"), chunk)


@pytest.mark.parametrize(
    ("field", "change", "fragments"),
    [
        ("ids", lambda m: setattr(m, "ids", m.ids[:-8]), ("import chunk 0 ids", "expected 24 bytes", "got 16")),
        ("values", lambda m: setattr(m, "width", 5), ("import chunk 0 values", "expected 60 bytes", "got 48")),
        ("update_times", lambda m: setattr(m, "update_times", m.update_times + b"\0"),
         ("import chunk 0 update_times", "expected 12 bytes", "got 13")),
        ("deleted_ids", lambda m: setattr(m, "num_deleted", 3),
         ("import chunk 0 deleted_ids", "expected 24 bytes", "got 16")),
        ("num_rows", lambda m: setattr(m, "num_rows", -1), ("import chunk 0 ids", "negative size")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bytes_that_do_not_fit_their_sizes_are_invalid_argument(
    field: str, change: Callable[[pb.RowChunk], None], fragments: tuple[str, ...]
) -> None:
    message = encode_chunk(_chunk())
    change(message)

    with pytest.raises(InvalidArgument) as caught:
        decode_chunk(message, "import chunk 0")

    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))
