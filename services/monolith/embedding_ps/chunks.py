"""The codec of `RowChunk`, the message that carries a table's rows between shards and clients.

Export streams chunks out of a shard; Import and Restore stream them in; the train→serve
sync, the checkpoint controller and the replay's frozen copy read them. All of them encode
and decode here, so the lengths are checked the same way everywhere (`decode_array`:
INVALID_ARGUMENT when the bytes do not fit the declared sizes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.common.wire import decode_array, encode_array
from monolith.embedding.table import RowBatch


def _no_ids() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One chunk of one table, as it travels: rows to upsert and ids to delete.

    Attributes:
        table: the table's name.
        rows: the rows; values are embeddings, followed by optimizer state when
            `includes_optimizer_state`.
        deleted_ids: int64 ids deleted (expired) since the export's `since_version`;
            deletions apply before the rows.
        version: the exporting shard's version the export is complete up to (0 when
            sent to a shard).
        incarnation: the exporting shard process's random id ("" when sent to a shard).
        newest_update_time: newest update time among the rows, seconds since the epoch;
            0 when not known or no rows.
        includes_optimizer_state: whether values carry optimizer state.
    """

    table: str
    rows: RowBatch
    deleted_ids: np.ndarray = dataclasses.field(default_factory=_no_ids)
    version: int = 0
    incarnation: str = ""
    newest_update_time: float = 0.0
    includes_optimizer_state: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.rows.ids.shape[0])

    @property
    def num_deleted(self) -> int:
        return int(self.deleted_ids.shape[0])


def encode_chunk(chunk: Chunk) -> pb.RowChunk:
    """The message of a chunk; rows' values must be 2-D ([rows, width])."""
    rows = chunk.rows
    return pb.RowChunk(
        table=chunk.table,
        num_rows=rows.ids.shape[0],
        width=rows.values.shape[1],
        includes_optimizer_state=chunk.includes_optimizer_state,
        ids=encode_array(rows.ids, "<i8"),
        values=encode_array(rows.values, "<f4"),
        update_times=encode_array(rows.update_times, "<u4"),
        num_deleted=chunk.deleted_ids.shape[0],
        deleted_ids=encode_array(chunk.deleted_ids, "<i8"),
        version=chunk.version,
        incarnation=chunk.incarnation,
        newest_update_time=chunk.newest_update_time,
    )


def decode_chunk(message: pb.RowChunk, what: str) -> Chunk:
    """A chunk of a message, its arrays read-only views of the message's bytes.

    Args:
        message: the chunk as received.
        what: names the chunk in errors, e.g. "import chunk 3: table 'item'"; each
            error adds the field ("... ids: expected 64 bytes ...").

    Raises:
        InvalidArgument: ids, values, update times or deleted ids do not fit the
            declared num_rows, width and num_deleted.
    """
    num_rows = message.num_rows  # each field read builds a Python object: read each once
    rows = RowBatch(
        ids=decode_array(message.ids, "<i8", (num_rows,), f"{what} ids"),
        values=decode_array(message.values, "<f4", (num_rows, message.width), f"{what} values"),
        update_times=decode_array(message.update_times, "<u4", (num_rows,), f"{what} update_times"),
    )
    return Chunk(
        table=message.table,
        rows=rows,
        deleted_ids=decode_array(message.deleted_ids, "<i8", (message.num_deleted,), f"{what} deleted_ids"),
        version=message.version,
        incarnation=message.incarnation,
        newest_update_time=message.newest_update_time,
        includes_optimizer_state=message.includes_optimizer_state,
    )
