"""Checkpoints on an fsspec file system: write, list, verify, read back, retain.

`CheckpointStore(url)` opens any fsspec URL: a local directory (the default), `memory://`
(tests), `s3://…`, `gs://…` in production. Writing goes through `CheckpointWriter`: data
files first, the manifest last and atomically, so a writer killed at any point leaves
either a complete checkpoint or a directory without a manifest, which nothing reads and
`retain` removes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import time
import uuid
from typing import Any, Iterator

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from monolith.checkpoint.checksums import CRC32C, checksum
from monolith.checkpoint.errors import CheckpointError, CheckpointNotFound, StorageUnavailable
from monolith.checkpoint.frames import Frame, RowFileWriter, read_frames
from monolith.checkpoint.manifest import (
    MANIFEST_NAME,
    DenseEntry,
    Manifest,
    ShardEntry,
    checkpoint_name,
    checkpoint_number,
    parse_manifest,
)

_LOGGER = logging.getLogger("monolith.checkpoint")

# Errors a file system raises when it cannot be reached or written; fsspec back-ends
# (s3fs, gcsfs) raise OSError subclasses for their network failures too.
_STORAGE_ERRORS = (OSError, TimeoutError)


@contextlib.contextmanager
def _storage(what: str) -> Iterator[None]:
    try:
        yield
    except (CheckpointError, CheckpointNotFound):
        raise
    except FileNotFoundError as exc:
        raise CheckpointError(f"{what}: missing file {exc.filename or exc}") from None
    except _STORAGE_ERRORS as exc:
        raise StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None


class CheckpointStore:
    """Checkpoints under one root.

    Args:
        url: an fsspec URL or a local path.
        fs: a file system to use instead of the URL's (tests inject faults with it).
    """

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
        self.url = url
        with _storage(f"checkpoint storage {url}"):
            if fs is None:
                fs, root = fsspec.core.url_to_fs(url)
            else:
                root = fs._strip_protocol(url)
            self.fs: fsspec.AbstractFileSystem = fs
            self.root: str = root.rstrip("/") or "/"
            self.fs.makedirs(self.root, exist_ok=True)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    # ------------------------------------------------------------------ listing

    def _directories(self) -> list[tuple[int, str]]:
        """(number, name) of every checkpoint directory, complete or not, oldest first."""
        with _storage(f"listing {self.url}"):
            entries = self.fs.ls(self.root, detail=False)
        out = []
        for entry in entries:
            name = posixpath.basename(str(entry).rstrip("/"))
            number = checkpoint_number(name)
            if number is not None:
                out.append((number, name))
        return sorted(out)

    def list(self) -> list[Manifest]:
        """Every complete checkpoint (one with a manifest), oldest first.

        Raises:
            CheckpointError: a manifest is unreadable (it names the checkpoint).
            StorageUnavailable: the storage cannot be listed.
        """
        out = []
        for _, name in self._directories():
            manifest = self._manifest_if_any(name)
            if manifest is not None:
                out.append(manifest)
        return out

    def unfinished(self) -> list[str]:
        """Checkpoint directories without a manifest (writes that never finished)."""
        return [name for _, name in self._directories() if self._manifest_if_any(name) is None]

    def _manifest_if_any(self, name: str) -> Manifest | None:
        path = self.path(name, MANIFEST_NAME)
        with _storage(f"reading {path}"):
            if not self.fs.exists(path):
                return None
            data = self.fs.cat_file(path)
        return parse_manifest(data, f"checkpoint {name}")

    def load(self, checkpoint_id: str | None = None) -> Manifest:
        """The manifest of a checkpoint, or of the newest one.

        Raises:
            CheckpointNotFound: no such checkpoint (or none at all).
            CheckpointError: its manifest is missing (unfinished) or damaged.
        """
        if checkpoint_id is None:
            manifests = self.list()
            if not manifests:
                raise CheckpointNotFound(f"no checkpoint in {self.url}")
            return manifests[-1]
        if checkpoint_number(checkpoint_id) is None:
            raise CheckpointNotFound(f"{checkpoint_id!r} is not a checkpoint id (expected ckpt-<8 digits>)")
        with _storage(f"reading {self.url}"):
            exists = self.fs.exists(self.path(checkpoint_id))
        if not exists:
            raise CheckpointNotFound(f"no checkpoint {checkpoint_id} in {self.url}")
        manifest = self._manifest_if_any(checkpoint_id)
        if manifest is None:
            raise CheckpointError(f"checkpoint {checkpoint_id} has no manifest: its write never finished")
        if manifest.id != checkpoint_id:
            raise CheckpointError(f"checkpoint {checkpoint_id}: its manifest names {manifest.id}")
        return manifest

    def chain(self, checkpoint_id: str | None = None) -> list[Manifest]:
        """The full checkpoint and every incremental up to `checkpoint_id` (default: newest), in order.

        Raises:
            CheckpointError: a link of the chain is missing or inconsistent.
        """
        chain = [self.load(checkpoint_id)]
        while chain[-1].parent is not None:
            child = chain[-1]
            try:
                parent = self.load(child.parent)
            except CheckpointNotFound:
                raise CheckpointError(f"checkpoint {child.id}: its parent {child.parent} is gone") from None
            if parent.base != child.base or parent.num_shards != child.num_shards:
                raise CheckpointError(
                    f"checkpoint {child.id}: its parent {parent.id} has base {parent.base} and "
                    f"{parent.num_shards} shard(s), it has base {child.base} and {child.num_shards}"
                )
            chain.append(parent)
        chain.reverse()
        if chain[0].kind != "full":
            raise CheckpointError(f"checkpoint chain of {chain[-1].id} does not start with a full checkpoint")
        return chain

    # ---------------------------------------------------------------- reading

    def read_file(self, manifest: Manifest, file: str) -> bytes:
        """A data file's bytes, checked against the manifest's size and checksum.

        Raises:
            CheckpointError: missing, of the wrong size, or not matching its checksum.
        """
        entry = next((f for f in manifest.files if f.file == file), None)
        if entry is None:
            raise CheckpointError(f"checkpoint {manifest.id} has no file {file!r}")
        path = self.path(manifest.id, file)
        with _storage(f"reading {path}"):
            if not self.fs.exists(path):
                raise CheckpointError(f"checkpoint {manifest.id}: file {file} is missing")
            data = self.fs.cat_file(path)
        if len(data) != entry.bytes:
            raise CheckpointError(f"checkpoint {manifest.id}: {file} has {len(data)} bytes, the manifest says {entry.bytes}")
        kind, expected = entry.checksum
        if checksum(kind, data) != expected:
            raise CheckpointError(f"checkpoint {manifest.id}: {file} does not match its checksum; it is damaged")
        return data

    def shard_frames(self, manifest: Manifest, index: int) -> Iterator[Frame]:
        """The frames of one shard's row file, checked."""
        entry = manifest.shards[index]
        return read_frames(self.read_file(manifest, entry.file), f"checkpoint {manifest.id} {entry.file}")

    def dense(self, manifest: Manifest) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """(version, tensors, optimizer state) of the dense snapshot; None if there is none."""
        if manifest.dense is None:
            return None
        data = self.read_file(manifest, manifest.dense.file)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"checkpoint {manifest.id}: {manifest.dense.file} is unreadable: {exc}") from None
        tensors = {k[len("param:") :]: v for k, v in arrays.items() if k.startswith("param:")}
        state = {k[len("state:") :]: v for k, v in arrays.items() if k.startswith("state:")}
        return manifest.dense.version, tensors, state

    def verify(self, checkpoint_id: str | None = None) -> list[Manifest]:
        """Checks a checkpoint's whole chain: manifests, every file's size and checksum, every frame.

        Returns:
            The chain, full checkpoint first.

        Raises:
            CheckpointNotFound, CheckpointError: what is wrong, naming the checkpoint and file.
        """
        chain = self.chain(checkpoint_id)
        for manifest in chain:
            for entry in manifest.shards:
                rows = deleted = 0
                for frame in self.shard_frames(manifest, entry.index):
                    rows += frame.rows.ids.shape[0]
                    deleted += frame.deleted_ids.shape[0]
                if (rows, deleted) != (entry.rows, entry.deleted):
                    raise CheckpointError(
                        f"checkpoint {manifest.id}: {entry.file} holds {rows} rows and {deleted} deletions, the "
                        f"manifest says {entry.rows} and {entry.deleted}"
                    )
            self.dense(manifest)
        return chain

    # ---------------------------------------------------------------- writing

    def begin(self, kind: str, num_shards: int, parent: Manifest | None = None) -> CheckpointWriter:
        """A writer for the next checkpoint (numbered after every directory, finished or not)."""
        if kind not in ("full", "incremental"):
            raise ValueError(f"kind must be 'full' or 'incremental', got {kind!r}")
        if (kind == "incremental") != (parent is not None):
            raise ValueError("an incremental checkpoint needs a parent, a full one none")
        if parent is not None and parent.num_shards != num_shards:
            raise CheckpointError(
                f"an incremental checkpoint of {num_shards} shard(s) cannot follow {parent.id} of {parent.num_shards}"
            )
        directories = self._directories()
        number = directories[-1][0] + 1 if directories else 1
        return CheckpointWriter(self, checkpoint_name(number), kind, num_shards, parent)

    def sync(self, path: str) -> None:
        """On a local disk, flushes a written file to the device (fsync), so the manifest written
        after it never names bytes a power loss could take back. Object stores need nothing."""
        if isinstance(self.fs, LocalFileSystem):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def write_manifest(self, manifest: Manifest) -> None:
        """Writes the manifest last and atomically: a temporary name renamed on a local disk
        (rename is atomic there), one whole-object write elsewhere (atomic on object stores)."""
        path = self.path(manifest.id, MANIFEST_NAME)
        data = manifest.to_json()
        with _storage(f"writing {path}"):
            if isinstance(self.fs, LocalFileSystem):
                temporary = self.path(manifest.id, f".{MANIFEST_NAME}.{uuid.uuid4().hex}")
                with open(temporary, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, path)
            else:
                self.fs.pipe_file(path, data)

    # -------------------------------------------------------------- retention

    def retain(self, keep_full: int) -> list[str]:
        """Keeps the newest `keep_full` full checkpoints and the incrementals built on them.

        Also removes unfinished directories older than the newest complete checkpoint
        (a writer that died). Returns the directories removed.
        """
        if keep_full < 1:
            raise ValueError(f"keep_full must be >= 1, got {keep_full}")
        manifests = self.list()
        fulls = [m.id for m in manifests if m.kind == "full"]
        kept_bases = set(fulls[-keep_full:])
        newest = manifests[-1].number if manifests else 0
        doomed = [m.id for m in manifests if m.base not in kept_bases]
        doomed += [name for number, name in self._directories()
                   if number < newest and self._manifest_if_any(name) is None]  # fmt: skip
        for name in doomed:
            with _storage(f"removing {self.path(name)}"):
                # The manifest goes first, so a removal cut short leaves an unfinished directory.
                manifest = self.path(name, MANIFEST_NAME)
                if self.fs.exists(manifest):
                    self.fs.rm(manifest)
                self.fs.rm(self.path(name), recursive=True)
        if doomed:
            _LOGGER.info("retention removed %s", ", ".join(doomed))
        return doomed


class CheckpointWriter:
    """Writes one checkpoint: shard row files and the dense snapshot, then `commit`.

    Nothing is readable until `commit` writes the manifest; a writer abandoned midway
    leaves an unfinished directory.
    """

    def __init__(self, store: CheckpointStore, checkpoint_id: str, kind: str, num_shards: int,
                 parent: Manifest | None) -> None:  # fmt: skip
        self.store = store
        self.id = checkpoint_id
        self.kind = kind
        self.num_shards = num_shards
        self.parent = parent
        self._shards: dict[int, ShardEntry] = {}
        self._dense: DenseEntry | None = None
        with _storage(f"creating {store.path(checkpoint_id)}"):
            store.fs.makedirs(store.path(checkpoint_id), exist_ok=True)

    @contextlib.contextmanager
    def shard(self, index: int, incarnation: str, since_version: int = 0) -> Iterator[ShardFile]:
        """Opens shard `index`'s row file; write frames, set `version`, and close (the with block)."""
        if not 0 <= index < self.num_shards or index in self._shards:
            raise ValueError(f"shard index {index} is out of 0..{self.num_shards - 1} or written twice")
        name = f"shard-{index:05d}.rows"
        with _storage(f"writing {self.store.path(self.id, name)}"):
            with self.store.fs.open(self.store.path(self.id, name), "wb") as f:
                out = ShardFile(RowFileWriter(f))
                yield out
            self.store.sync(self.store.path(self.id, name))
        w = out.writer
        self._shards[index] = ShardEntry(file=name, bytes=w.bytes, crc32c=w.crc32c, index=index,
                                         incarnation=incarnation, version=out.version, since_version=since_version,
                                         rows=w.rows, deleted=w.deleted)  # fmt: skip

    def write_dense(self, version: int, incarnation: str, tensors: dict[str, np.ndarray],
                    optimizer_state: dict[str, np.ndarray]) -> None:  # fmt: skip
        """Writes the dense snapshot (an .npz of "param:<name>" and "state:<name>" arrays)."""
        buffer = io.BytesIO()
        arrays = {f"param:{k}": v for k, v in tensors.items()}
        arrays.update({f"state:{k}": v for k, v in optimizer_state.items()})
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        data = buffer.getvalue()
        name = "dense.npz"
        with _storage(f"writing {self.store.path(self.id, name)}"):
            with self.store.fs.open(self.store.path(self.id, name), "wb") as f:
                f.write(data)
            self.store.sync(self.store.path(self.id, name))
        self._dense = DenseEntry(file=name, bytes=len(data), crc32c=checksum(CRC32C, data),
                                 version=version, incarnation=incarnation)  # fmt: skip

    def commit(self, stream: dict[str, Any] | None = None, pause_seconds: float = 0.0) -> Manifest:
        """Writes the manifest (last, atomically): from now on the checkpoint is readable.

        Raises:
            ValueError: a shard's rows were not written.
        """
        missing = sorted(set(range(self.num_shards)) - set(self._shards))
        if missing:
            raise ValueError(f"checkpoint {self.id}: shard(s) {missing} not written")
        manifest = Manifest(
            id=self.id,
            kind=self.kind,  # type: ignore[arg-type]
            parent=self.parent.id if self.parent else None,
            base=self.parent.base if self.parent else self.id,
            created_at=time.time(),
            num_shards=self.num_shards,
            shards=tuple(self._shards[i] for i in range(self.num_shards)),
            dense=self._dense,
            stream=stream or {},
            pause_seconds=pause_seconds,
        )
        self.store.write_manifest(manifest)
        return manifest


class ShardFile:
    """A shard's row file being written: `write` frames, then set `version`."""

    def __init__(self, writer: RowFileWriter) -> None:
        self.writer = writer
        self.version = 0

    def write(self, table: str, rows: Any, deleted_ids: np.ndarray) -> None:
        self.writer.write(table, rows, deleted_ids)
