"""The row file of one shard: a header, then frames of one table's rows or deleted ids.

Layout (all little-endian): the 8 bytes MAGIC, then frames. A frame is a uint32 header
length, a JSON header `{"table", "rows", "width", "deleted"}`, then the arrays: ids int64
[rows], values float32 [rows, width], update times uint32 [rows], deleted ids int64
[deleted]. Arrays are written as raw bytes straight from numpy, so writing costs what the
disk costs; the CRC32C of everything written is kept on the way for the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import IO, Iterator

import numpy as np

from monolith.checkpoint.checksums import CRC32C, Checksum
from monolith.checkpoint.errors import CheckpointError
from monolith.embedding.table import RowBatch

MAGIC = b"MNLTROW1"
_LENGTH = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 16


@dataclasses.dataclass(frozen=True)
class Frame:
    """One table's rows (full width: embedding + optimizer state) and/or deleted ids."""

    table: str
    rows: RowBatch
    deleted_ids: np.ndarray


class ChecksumWriter:
    """Writes to a binary file, counting bytes and checksumming them (CRC32C) on the way."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._checksum = Checksum(CRC32C)
        self.bytes = 0

    def write(self, data: bytes | memoryview) -> None:
        self._checksum.update(data)
        self._f.write(data)
        self.bytes += len(data)

    @property
    def crc32c(self) -> str:
        return self._checksum.hexdigest()


class RowFileWriter:
    """Writes frames to a row file.

    Attributes:
        rows: rows written so far.
        deleted: deleted ids written so far.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._out = ChecksumWriter(f)
        self._out.write(MAGIC)
        self.rows = 0
        self.deleted = 0

    def write(self, table: str, rows: RowBatch, deleted_ids: np.ndarray) -> None:
        n, d = int(rows.ids.shape[0]), int(deleted_ids.shape[0])
        width = int(rows.values.shape[1]) if rows.values.ndim == 2 else 0
        header = json.dumps({"table": table, "rows": n, "width": width, "deleted": d}).encode()
        self._out.write(_LENGTH.pack(len(header)))
        self._out.write(header)
        for array, dtype in ((rows.ids, "<i8"), (rows.values, "<f4"), (rows.update_times, "<u4"),
                             (deleted_ids, "<i8")):  # fmt: skip
            if array.size:
                self._out.write(memoryview(np.ascontiguousarray(array, dtype=dtype).reshape(-1)).cast("B"))
        self.rows += n
        self.deleted += d

    @property
    def bytes(self) -> int:
        return self._out.bytes

    @property
    def crc32c(self) -> str:
        return self._out.crc32c


def read_frames(data: bytes, where: str) -> Iterator[Frame]:
    """The frames of a row file's bytes (already checked against the manifest's checksum).

    Raises:
        CheckpointError: the bytes are not a row file, or end inside a frame.
    """
    if data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{where}: not a checkpoint row file (bad magic)")
    view = memoryview(data)
    at = len(MAGIC)
    while at < len(data):
        if at + _LENGTH.size > len(data):
            raise CheckpointError(f"{where}: truncated at byte {at}")
        (length,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if length > MAX_HEADER_BYTES or at + length > len(data):
            raise CheckpointError(f"{where}: bad frame header at byte {at}")
        try:
            header = json.loads(bytes(view[at : at + length]))
            table, n, width, d = str(header["table"]), int(header["rows"]), int(header["width"]), int(header["deleted"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: bad frame header at byte {at}: {exc}") from None
        at += length
        sizes = (n * 8, n * width * 4, n * 4, d * 8)
        if min(n, width, d) < 0 or at + sum(sizes) > len(data):
            raise CheckpointError(f"{where}: frame of table {table!r} at byte {at} runs past the end")
        arrays = []
        for size, dtype in zip(sizes, ("<i8", "<f4", "<u4", "<i8")):
            arrays.append(np.frombuffer(view[at : at + size], dtype=dtype))
            at += size
        ids, values, times, deleted = arrays
        yield Frame(table, RowBatch(ids, values.reshape(n, width), times), deleted)
