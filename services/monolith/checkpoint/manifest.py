"""The manifest: what one checkpoint holds, with a checksum of every file, written last.

A checkpoint is a directory `<root>/ckpt-<id>/` of data files and `manifest.json`. The
manifest is written only after every data file is closed, and atomically (a rename on a
local disk; one object PUT on object stores), so a directory without a manifest is an
unfinished checkpoint and is never read. Checksums and sizes of every file let a restore
(and `monolith checkpoint verify`) refuse a damaged one.

Formats: 2 (written now) checksums files with CRC32C; 1 (written before) with SHA-256,
and is still read. A manifest of any other format is refused with one line saying so.

Incremental checkpoints name their parent (the previous checkpoint) and their base (the
full checkpoint the chain starts from); a restore applies the base, then every
incremental up to the chosen one, in order.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from monolith.common.config import LIST_AS_TUPLE, ConfigModel
from monolith.checkpoint.checksums import CRC32C, SHA256
from monolith.checkpoint.errors import CheckpointError

FORMAT = 2
READABLE_FORMATS = (1, 2)
_FORMAT_CHECKSUM = {1: SHA256, 2: CRC32C}  # the checksum each format's files carry
MANIFEST_NAME = "manifest.json"
_ID = re.compile(r"^ckpt-(\d{8})$")


def checkpoint_name(number: int) -> str:
    """The directory (and id) of checkpoint `number`: ids sort as they were taken."""
    return f"ckpt-{number:08d}"


def checkpoint_number(name: str) -> int | None:
    """The number of a checkpoint directory name; None for anything else."""
    match = _ID.match(name)
    return int(match.group(1)) if match else None


class FileEntry(ConfigModel):
    """One data file of a checkpoint.

    Attributes:
        file: its name inside the checkpoint's directory.
        bytes: its size.
        crc32c: the CRC32C of its bytes, 8 hex digits (format 2).
        sha256: the SHA-256 of its bytes, 64 hex digits (format 1); exactly one of the two.
    """

    file: Annotated[str, Field(min_length=1)]
    bytes: Annotated[int, Field(ge=0)]
    crc32c: Annotated[str, Field(pattern=r"^[0-9a-f]{8}$")] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @pydantic.model_validator(mode="after")
    def _one_checksum(self) -> FileEntry:
        if (self.crc32c is None) == (self.sha256 is None):
            raise ValueError(f"file {self.file}: expected exactly one checksum, crc32c or sha256")
        return self

    @property
    def checksum(self) -> tuple[str, str]:
        """(kind, hex digest) of the file's checksum."""
        return (CRC32C, self.crc32c) if self.crc32c is not None else (SHA256, self.sha256)  # type: ignore[return-value]


class ShardEntry(FileEntry):
    """The rows of one embedding-PS shard.

    Attributes:
        index: the shard's index.
        incarnation: the shard's incarnation when it was exported.
        version: the shard version the export is complete up to (the next incremental
            exports since it).
        since_version: 0 for a full export; the parent's version for an incremental one.
        rows: rows in the file.
        deleted: deleted ids in the file (incrementals only).
    """

    index: Annotated[int, Field(ge=0)]
    incarnation: str
    version: Annotated[int, Field(ge=0)]
    since_version: Annotated[int, Field(ge=0)] = 0
    rows: Annotated[int, Field(ge=0)]
    deleted: Annotated[int, Field(ge=0)] = 0


class DenseEntry(FileEntry):
    """The dense-PS's parameters and optimizer state (an .npz file).

    Attributes:
        version: the dense-PS's version.
        incarnation: its incarnation when snapshotted.
    """

    version: Annotated[int, Field(ge=0)]
    incarnation: str


class Manifest(ConfigModel):
    """What one checkpoint holds.

    Attributes:
        format: the manifest format: FORMAT when written now, or 1 (SHA-256 checksums).
        id: the checkpoint's directory name, "ckpt-<8 digits>".
        kind: "full" or "incremental".
        parent: the previous checkpoint of the chain (incrementals only).
        base: the full checkpoint the chain starts from (itself for a full one).
        created_at: wall-clock seconds since the epoch when it was written (for people;
            nothing orders by it).
        num_shards: the embedding-PS shard count the rows were exported from.
        shards: one entry per shard, index 0..num_shards-1.
        dense: the dense-PS snapshot (None when there was no dense-PS to snapshot).
        stream: the trainers' position in the samples stream at the cut (free-form:
            the controller writes it, and reads it back to roll the trainers back).
        pause_seconds: how long training was paused for the cut.
    """

    format: Literal[1, 2] = FORMAT
    id: Annotated[str, Field(pattern=r"^ckpt-\d{8}$")]
    kind: Literal["full", "incremental"]
    parent: str | None = None
    base: str
    created_at: float
    num_shards: Annotated[int, Field(ge=1)]
    shards: Annotated[tuple[ShardEntry, ...], LIST_AS_TUPLE]
    dense: DenseEntry | None = None
    stream: dict[str, Any] = Field(default_factory=dict)
    pause_seconds: Annotated[float, Field(ge=0)] = 0.0

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if [s.index for s in self.shards] != list(range(self.num_shards)):
            raise ValueError(
                f"shards: expected one entry per shard 0..{self.num_shards - 1}, got indices "
                f"{[s.index for s in self.shards]}"
            )
        wanted = _FORMAT_CHECKSUM[self.format]
        for entry in self.files:
            if entry.checksum[0] != wanted:
                raise ValueError(f"format {self.format} checksums files with {wanted}; {entry.file} has {entry.checksum[0]}")
        if self.kind == "full" and (self.parent is not None or self.base != self.id):
            raise ValueError("a full checkpoint has no parent and is its own base")
        if self.kind == "incremental" and (self.parent is None or self.base == self.id):
            raise ValueError("an incremental checkpoint needs a parent and a base other than itself")
        return self

    @property
    def number(self) -> int:
        number = checkpoint_number(self.id)
        assert number is not None
        return number

    @property
    def files(self) -> list[FileEntry]:
        """Every data file the manifest names."""
        return [*self.shards, *([self.dense] if self.dense else [])]

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=1, sort_keys=True).encode()


def parse_manifest(data: bytes, where: str) -> Manifest:
    """A manifest read from `where`.

    Raises:
        CheckpointError: not JSON, or not a valid manifest (naming the field).
    """
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: the manifest is not valid JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: the manifest is not a JSON object; the checkpoint is damaged")
    if raw.get("format", FORMAT) not in READABLE_FORMATS:
        raise CheckpointError(
            f"{where}: manifest format {raw.get('format')!r}; this version reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    try:
        return Manifest.model_validate_json(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise CheckpointError(f"{where}: invalid manifest ({problems}); the checkpoint is damaged") from None
