"""The checkpoint library on memory:// and local directories: write, read back, reshard,
survive a writer killed at any point, refuse damaged checkpoints with clear errors."""

from __future__ import annotations

import hashlib
import json
import uuid

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from monolith.checkpoint.errors import CheckpointError, CheckpointNotFound
from monolith.checkpoint.manifest import Manifest
from monolith.checkpoint.restore import restore_plan
from monolith.checkpoint.store import CheckpointStore
from monolith.embedding.config import OptimizerConfig, TableConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding_ps.routing import route_to_shards
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig

TABLES = (
    TableConfig(name="user", dim=4, optimizer=OptimizerConfig(kind="adagrad"), expire_after=500.0),
    TableConfig(name="item", dim=3, optimizer=OptimizerConfig(kind="adam")),
    TableConfig(name="user/bias", dim=1, optimizer=OptimizerConfig(kind="ftrl")),
)


def route(table: str, ids: np.ndarray, num_shards: int) -> np.ndarray:
    return route_to_shards(ids, stable_hash64(table), num_shards)


def make_shards(n: int) -> list[EmbeddingShard]:
    return [EmbeddingShard(ShardConfig(shard=i, num_shards=n, role="training", tables=TABLES)) for i in range(n)]


def train(shards: list[EmbeddingShard], ids: np.ndarray, when: float, seed: int) -> None:
    """Creates rows for `ids` and applies random gradients, each id on its shard."""
    rng = np.random.default_rng(seed)
    n = len(shards)
    for i, shard in enumerate(shards):
        requests, grads = [], []
        for t in TABLES:
            mine = ids[route(t.name, ids, n) == i]
            requests.append((t.name, mine, None))
            grads.append((t.name, mine, rng.normal(size=(mine.shape[0], t.dim)).astype(np.float32)))
        shard.lookup(requests, True, when)
        shard.apply_gradients(grads, when)


def live_rows(shards: list[EmbeddingShard]) -> dict[str, dict[int, bytes]]:
    """Every row of every table (embedding + optimizer state + update time), by id."""
    out: dict[str, dict[int, bytes]] = {t.name: {} for t in TABLES}
    for shard in shards:
        for c in shard.export(0, True):
            for k, row_id in enumerate(c.rows.ids.tolist()):
                out[c.table][row_id] = c.rows.values[k].tobytes() + c.rows.update_times[k].tobytes()
    return out


def take_checkpoint(store: CheckpointStore, shards: list[EmbeddingShard], parent: Manifest | None = None) -> Manifest:
    """What the controller does: a full export, or an incremental one since the parent's versions."""
    writer = store.begin("incremental" if parent else "full", len(shards), parent)
    for i, shard in enumerate(shards):
        since = parent.shards[i].version if parent else 0
        with writer.shard(i, shard.incarnation, since) as out:
            out.version = shard.version
            for chunk in shard.export(since, True, max_rows=64):
                out.write(chunk.table, chunk.rows, chunk.deleted_ids)
                out.version = chunk.version
    writer.write_dense(7, "dense-1", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
                       {"w/accumulator": np.ones((2, 3), np.float32), "step": np.array(3, np.int64)})  # fmt: skip
    return writer.commit(stream={"consumer": "trainer", "ack_floor": 42})


def restored_rows(store: CheckpointStore, chain: list[Manifest], num_shards: int) -> list[EmbeddingShard]:
    """New shards restored from the chain through the shards' own Restore path."""
    plan = restore_plan(store, chain, num_shards, route, max_rows=50)
    shards = [EmbeddingShard(ShardConfig(shard=i, num_shards=num_shards, role="training", tables=TABLES,
                                         restore_required=True)) for i in range(num_shards)]  # fmt: skip
    empty = np.zeros(0, np.int64)
    for shard, chunks in zip(shards, plan):
        shard.restore((c.table, c.rows, empty, "") for c in chunks)  # refuses rows of other shards
    return shards


@pytest.fixture
def store() -> CheckpointStore:
    return CheckpointStore(f"memory://ckpt-{uuid.uuid4().hex}")


def test_full_plus_incrementals_restore_the_live_state_row_for_row(store: CheckpointStore) -> None:
    shards = make_shards(2)
    train(shards, np.arange(0, 300), 1000.0, seed=1)
    full = take_checkpoint(store, shards)
    train(shards, np.arange(200, 500), 1400.0, seed=2)  # updates and new rows
    first = take_checkpoint(store, shards, full)
    train(shards, np.arange(450, 600), 1700.0, seed=3)
    for shard in shards:
        assert shard.expire()["user"] > 0  # users not seen since 1000 expire: deletions
    second = take_checkpoint(store, shards, first)

    assert [m.kind for m in store.list()] == ["full", "incremental", "incremental"]
    assert second.shards[0].deleted > 0 and second.shards[0].rows < full.shards[0].rows
    chain = store.verify()
    assert [m.id for m in chain] == [full.id, first.id, second.id]
    assert live_rows(restored_rows(store, chain, 2)) == live_rows(shards)
    # An older point of the chain restores that point.
    assert store.chain(first.id)[-1].id == first.id


@pytest.mark.parametrize("before, after", [(2, 3), (3, 2), (2, 1)])
def test_resharding_keeps_every_row_with_its_optimizer_state(store: CheckpointStore, before: int, after: int) -> None:
    shards = make_shards(before)
    train(shards, np.arange(0, 400), 1000.0, seed=4)
    full = take_checkpoint(store, shards)
    train(shards, np.arange(300, 500), 1100.0, seed=5)
    take_checkpoint(store, shards, full)

    restored = restored_rows(store, store.chain(), after)

    assert live_rows(restored) == live_rows(shards)
    for i, shard in enumerate(restored):  # every row on its owner among `after` shards
        for c in shard.export(0, False):
            assert (route(c.table, c.rows.ids, after) == i).all()


def test_dense_and_stream_position_round_trip(store: CheckpointStore) -> None:
    shards = make_shards(1)
    train(shards, np.arange(10), 1000.0, seed=6)
    take_checkpoint(store, shards)
    manifest = store.load()
    version, tensors, state = store.dense(manifest)  # type: ignore[misc]
    assert version == 7 and tensors["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert int(state["step"]) == 3 and state["w/accumulator"].shape == (2, 3)
    assert manifest.stream == {"consumer": "trainer", "ack_floor": 42}


class CrashingFileSystem(MemoryFileSystem):
    """A memory file system (its own, not the shared one) whose writer "dies" once `budget`
    bytes and operations are spent: it raises KeyboardInterrupt, which no writer handles,
    after a torn write (the bytes that fit land)."""

    protocol = "crashing"
    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.store = {}
        self.pseudo_dirs = [""]
        self.budget = 10**12

    def _spend(self, amount: int) -> None:
        self.budget -= amount
        if self.budget < 0:
            raise KeyboardInterrupt("killed")

    def open(self, path, mode="rb", **kwargs):  # type: ignore[no-untyped-def, override]
        if "w" in mode:
            self._spend(1)  # before the file exists (memory's pipe_file creates it in open)
        f = super().open(path, mode, **kwargs)
        if "w" in mode:
            write = f.write

            def crashing_write(data):  # type: ignore[no-untyped-def]
                data = bytes(data)
                if self.budget < len(data):
                    write(data[: max(self.budget, 0)])
                self._spend(len(data))
                return write(data)

            f.write = crashing_write
        return f



def test_a_writer_killed_at_any_point_never_leaves_a_readable_broken_checkpoint() -> None:
    shards = make_shards(2)
    train(shards, np.arange(0, 120), 1000.0, seed=7)
    expected = live_rows(shards)
    # How many bytes and operations two checkpoints take; the writer is then killed at many points in them.
    probe = CrashingFileSystem()
    full = take_checkpoint(CheckpointStore("/ckpt", fs=probe), shards)
    take_checkpoint(CheckpointStore("/ckpt", fs=probe), shards, full)
    total = 10**12 - probe.budget
    points = {0, 1, total - 1, *np.random.default_rng(0).integers(0, total, 60).tolist()}
    outcomes = set()
    for budget in sorted(points):
        fs = CrashingFileSystem()
        store = CheckpointStore("/ckpt", fs=fs)
        fs.budget = budget
        completed = 0
        try:
            parent = take_checkpoint(store, shards)
            completed = 1
            take_checkpoint(store, shards, parent)
            completed = 2
        except KeyboardInterrupt:
            pass
        fs.budget = 10**12
        after = CheckpointStore("/ckpt", fs=fs)  # a new process reading what was left
        listed = after.list()
        assert len(listed) == completed, budget
        outcomes.add((completed, bool(after.unfinished())))
        for manifest in listed:
            after.verify(manifest.id)
        if listed:
            assert live_rows(restored_rows(after, after.chain(), 2)) == expected
    # Kills before the first manifest, between the two checkpoints, and inside the second one.
    assert {(0, True), (1, True)} <= outcomes


def test_retention_keeps_the_newest_full_checkpoints_and_their_incrementals(store: CheckpointStore) -> None:
    shards = make_shards(1)
    train(shards, np.arange(20), 1000.0, seed=8)
    ids = []
    for _ in range(3):
        full = take_checkpoint(store, shards)
        incremental = take_checkpoint(store, shards, full)
        ids.append((full.id, incremental.id))
    unfinished = store.begin("full", 1)  # a writer that died before its manifest
    removed = store.retain(keep_full=2)
    assert removed == [*ids[0]]
    assert [m.id for m in store.list()] == [*ids[1], *ids[2]]
    assert store.unfinished() == [unfinished.id]  # newer than every complete one: maybe still being written
    take_checkpoint(store, shards)
    store.retain(keep_full=2)
    assert store.unfinished() == []


def test_damaged_checkpoints_are_refused_with_clear_errors(store: CheckpointStore) -> None:
    shards = make_shards(2)
    train(shards, np.arange(50), 1000.0, seed=9)
    full = take_checkpoint(store, shards)
    incremental = take_checkpoint(store, shards, full)
    fs = store.fs

    with pytest.raises(CheckpointNotFound, match="no checkpoint ckpt-00000009"):
        store.load("ckpt-00000009")
    with pytest.raises(CheckpointNotFound, match="not a checkpoint id"):
        store.load("latest")
    with pytest.raises(CheckpointNotFound, match="no checkpoint in"):
        CheckpointStore(f"memory://empty-{uuid.uuid4().hex}").load()

    # A flipped byte in a row file.
    path = store.path(full.id, full.shards[1].file)
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(CheckpointError, match=rf"{full.id}: shard-00001.rows does not match its checksum"):
        store.verify()
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    store.verify()

    # A missing file, a missing parent.
    dense = store.path(incremental.id, "dense.npz")
    saved = fs.cat_file(dense)
    fs.rm(dense)
    with pytest.raises(CheckpointError, match="dense.npz is missing"):
        store.verify()
    fs.pipe_file(dense, saved)

    # A manifest that is not JSON, one with the wrong shard entries, one missing.
    manifest_path = store.path(incremental.id, "manifest.json")
    good = fs.cat_file(manifest_path)
    fs.pipe_file(manifest_path, b"{not json")
    with pytest.raises(CheckpointError, match=rf"checkpoint {incremental.id}: the manifest is not valid JSON"):
        store.list()
    raw = json.loads(good)
    raw["num_shards"] = 3
    fs.pipe_file(manifest_path, json.dumps(raw).encode())
    with pytest.raises(CheckpointError, match=r"expected one entry per shard 0..2, got indices \[0, 1\]"):
        store.load(incremental.id)
    fs.rm(manifest_path)
    with pytest.raises(CheckpointError, match="has no manifest: its write never finished"):
        store.load(incremental.id)
    assert store.load().id == full.id  # the newest complete one

    fs.pipe_file(manifest_path, good)
    fs.rm(store.path(full.id), recursive=True)
    with pytest.raises(CheckpointError, match=f"its parent {full.id} is gone"):
        store.chain()


def test_checkpoints_of_format_1_still_restore_and_unknown_formats_are_refused(store: CheckpointStore) -> None:
    """Format 1 checksummed files with SHA-256; a manifest rewritten that way reads as before."""
    shards = make_shards(2)
    train(shards, np.arange(60), 1000.0, seed=11)
    full = take_checkpoint(store, shards)
    assert full.format == 2 and all(f.crc32c and f.sha256 is None for f in full.files)
    manifest_path = store.path(full.id, "manifest.json")
    current = json.loads(store.fs.cat_file(manifest_path))

    old = json.loads(json.dumps(current))
    old["format"] = 1
    for entry in [*old["shards"], old["dense"]]:
        del entry["crc32c"]
        entry["sha256"] = hashlib.sha256(store.fs.cat_file(store.path(full.id, entry["file"]))).hexdigest()
    store.fs.pipe_file(manifest_path, json.dumps(old).encode())
    assert [m.id for m in store.verify()] == [full.id]
    assert live_rows(restored_rows(store, store.chain(), 3)) == live_rows(shards)
    # A flipped byte is caught by the old checksum too.
    path = store.path(full.id, full.shards[0].file)
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    store.fs.pipe_file(path, bytes(data))
    with pytest.raises(CheckpointError, match="shard-00000.rows does not match its checksum"):
        store.verify()

    newer = dict(current, format=3)
    store.fs.pipe_file(manifest_path, json.dumps(newer).encode())
    with pytest.raises(CheckpointError, match=r"manifest format 3; this version reads formats 1, 2"):
        store.load(full.id)
    mixed = dict(current, format=1)  # format 1 with CRC32C entries: not a manifest any version wrote
    store.fs.pipe_file(manifest_path, json.dumps(mixed).encode())
    with pytest.raises(CheckpointError, match="format 1 checksums files with sha256"):
        store.load(full.id)


def test_a_local_directory_works_the_same(tmp_path: pytest.TempPathFactory) -> None:
    store = CheckpointStore(str(tmp_path))
    shards = make_shards(2)
    train(shards, np.arange(100), 1000.0, seed=10)
    full = take_checkpoint(store, shards)
    assert not [p for p in fsspec.filesystem("file").ls(store.path(full.id)) if ".manifest.json." in p]
    assert live_rows(restored_rows(store, store.verify(), 2)) == live_rows(shards)
