"""Serving never follows an empty or un-restored parameter server.

A training shard or dense-PS started awaiting a restore refuses work until restored;
serving shards keep their rows while the shard they follow waits, then copy it in full;
one full copy deletes at most a fraction of a serving shard's rows; model-serving notices
a new dense-PS incarnation and keeps its parameters until that one is restored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest

from helpers.metrics import registry_value
from helpers.sync import sync_until
from helpers.tables import exported_rows
from helpers.waiting import wait_for
from monolith.common.errors import Unavailable
from monolith.common.server import MonolithServer, ServerConfig
from monolith.dense_ps.client import DensePSClient
from monolith.dense_ps.service import build_dense_ps
from monolith.dense_ps.store import DenseStore
from monolith.embedding.config import OptimizerConfig, TableConfig
from monolith.embedding.hashing import stable_hash64
from monolith.embedding.table import RowBatch
from monolith.embedding_ps.routing import route_to_shards
from monolith.embedding_ps.service import build_embedding_ps
from monolith.embedding_ps.shard import EmbeddingShard, ShardConfig
from monolith.embedding_ps.sync import ServingSync
from monolith.model.config import DenseOptimizerConfig

TABLES = (
    TableConfig(name="user", dim=4, optimizer=OptimizerConfig(kind="adagrad")),
    TableConfig(name="item", dim=3, optimizer=OptimizerConfig(kind="sgd", learning_rate=0.5)),
)
NUM_SHARDS = 2


def ids_for(name: str, n: int, shard: int = 0) -> np.ndarray:
    candidates = np.arange(0, 8 * n + 64, dtype=np.int64)
    return candidates[route_to_shards(candidates, stable_hash64(name), NUM_SHARDS) == shard][:n]


USERS, ITEMS = ids_for("user", 40), ids_for("item", 60)


def make_shard(role: str = "training", restore_required: bool = False) -> EmbeddingShard:
    config = ShardConfig(shard=0, num_shards=NUM_SHARDS, role=role, tables=TABLES, export_chunk_rows=16,
                         restore_required=restore_required)  # fmt: skip
    return EmbeddingShard(config)


def train(shard: EmbeddingShard, users: np.ndarray = USERS, items: np.ndarray = ITEMS) -> None:
    shard.lookup([("user", users, None), ("item", items, None)], True, 1000.0)
    shard.apply_gradients([("user", users[:5], np.ones((5, 4), np.float32))], 1001.0)


def checkpoint_of(shard: EmbeddingShard) -> list[tuple[str, RowBatch, np.ndarray, str]]:
    """A full export with optimizer state, as a checkpoint holds it."""
    return [(c.table, c.rows, c.deleted_ids, "") for c in shard.export(0, True)]


# ------------------------------------------------------------ the training shard


def test_a_shard_awaiting_restore_refuses_work_until_restored() -> None:
    live = make_shard()
    train(live)
    restarted = make_shard(restore_required=True)
    restored_calls: list[bool] = []
    restarted.on_restored = lambda: restored_calls.append(True)
    old_incarnation = restarted.incarnation

    for attempt in (
        lambda: restarted.lookup([("user", USERS, None)], True),
        lambda: restarted.lookup([("user", USERS, None)], False),
        lambda: restarted.apply_gradients([("user", USERS[:1], np.ones((1, 4), np.float32))]),
        lambda: list(restarted.export(0, False)),
        lambda: restarted.import_chunk("user", checkpoint_of(live)[0][1], np.zeros(0, np.int64)),
    ):
        with pytest.raises(Unavailable, match="waiting to be restored"):
            attempt()
    assert restarted.awaiting_restore

    held = restarted.restore(checkpoint_of(live))

    assert held == len(USERS) + len(ITEMS) and restored_calls == [True]
    assert not restarted.awaiting_restore and restarted.incarnation != old_incarnation
    assert exported_rows([restarted]) == exported_rows([live])  # embeddings, optimizer state and update times
    train(restarted)  # writes are accepted again


def test_a_bad_restore_changes_nothing() -> None:
    live = make_shard()
    train(live)
    shard = make_shard(restore_required=True)
    chunks = checkpoint_of(live)
    name, rows, deleted, _ = chunks[-1]
    bad = RowBatch(rows.ids, np.full_like(rows.values, np.nan), rows.update_times)
    with pytest.raises(Exception, match="finite"):
        shard.restore([*chunks[:-1], (name, bad, deleted, "bad chunk")])
    assert shard.awaiting_restore and all(len(t) == 0 for t in shard.tables.values())


def test_a_restore_replaces_a_live_shard_and_rolls_it_back() -> None:
    shard = make_shard()
    train(shard, USERS[:10], ITEMS[:10])
    cut = checkpoint_of(shard)
    expected = exported_rows([shard])
    train(shard)  # changes after the cut: new rows and updates
    shard.restore(cut)
    assert exported_rows([shard]) == expected


def test_serving_refuses_to_be_restore_required() -> None:
    with pytest.raises(ValueError, match="restore_required"):
        make_shard("serving", restore_required=True)


# ------------------------------------------------------------ serving shards


class Training:
    """A training shard served in this process; restarting keeps the port."""

    def __init__(self) -> None:
        self.port = 0
        self.server: MonolithServer | None = None
        self.shard = make_shard()
        self.serve(self.shard)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serve(self, shard: EmbeddingShard) -> None:
        if self.server is not None:
            self.server.stop(grace=0)
        self.server = build_embedding_ps(shard, ServerConfig(host="127.0.0.1", port=self.port, metrics_port=None))
        self.server.start(serving=not shard.awaiting_restore)
        self.shard, self.port = shard, self.server.port


@pytest.fixture
def training() -> Iterator[Training]:
    t = Training()
    yield t
    assert t.server is not None
    t.server.stop(grace=0)


def test_serving_keeps_its_rows_until_the_restarted_shard_is_restored(training: Training) -> None:
    train(training.shard)
    serving = make_shard("serving")
    sync = ServingSync(serving, training.address)
    try:
        assert sync.sync_once().ok
        before = exported_rows([serving])
        cut = checkpoint_of(training.shard)

        training.serve(make_shard(restore_required=True))  # SIGKILLed and restarted, awaiting its restore
        waiting = sync_until(sync, ok=False)
        assert "waiting to be restored" in waiting.error
        assert exported_rows([serving]) == before  # nothing deleted, nothing copied

        training.shard.restore(cut)
        copied = sync_until(sync, ok=True)
        assert copied.full_resync and copied.deletions == 0
        assert sync.acknowledged is not None and sync.acknowledged[0] == training.shard.incarnation
        embeddings = {t: {i: r[: 4 * TABLES[k].dim] for i, r in rows.items()}
                      for k, (t, rows) in enumerate(exported_rows([training.shard]).items())}  # fmt: skip
        assert {t: {i: r[: 4 * TABLES[k].dim] for i, r in rows.items()}
                for k, (t, rows) in enumerate(exported_rows([serving]).items())} == embeddings  # fmt: skip
    finally:
        sync.stop()


@pytest.mark.parametrize("fraction, alarmed", [(0.1, True), (0.9, False)])
def test_a_training_shard_that_lost_rows_never_shrinks_serving_and_past_the_fraction_is_alarmed(
    training: Training, caplog: pytest.LogCaptureFixture, fraction: float, alarmed: bool
) -> None:
    train(training.shard)
    serving = make_shard("serving")
    sync = ServingSync(serving, training.address, max_resync_delete_fraction=fraction)
    refused_before = registry_value("monolith_sync_resync_deletions_refused_total", shard="0")
    try:
        assert sync.sync_once().ok
        rows = len(USERS) + len(ITEMS)
        # Restarted without a restore, holding half the rows: the other half stays served.
        restarted = make_shard()
        train(restarted, USERS[:20], ITEMS[:30])
        training.serve(restarted)
        with caplog.at_level(logging.ERROR, logger="monolith.embedding_ps.sync"):
            result = sync_until(sync, ok=True)
        held = sum(len(t) for t in serving.tables.values())
        refused = registry_value("monolith_sync_resync_deletions_refused_total", shard="0") - refused_before
        assert (result.deletions, held, len(sync.retained)) == (0, rows, 50)
        assert registry_value("monolith_sync_retained_rows", shard="0") == 50
        assert refused == (50 if alarmed else 0)
        assert any("restarted without being restored" in r.getMessage() for r in caplog.records) == alarmed
    finally:
        sync.stop()


# ------------------------------------------------------------ the dense-PS


def test_a_dense_store_awaiting_restore_refuses_init_pull_and_push() -> None:
    live = DenseStore(DenseOptimizerConfig(kind="adagrad"))
    live.init({"w": np.ones((2, 2), np.float32)})
    live.push({"w": np.ones((2, 2), np.float32)})
    snap = live.snapshot()

    store = DenseStore(DenseOptimizerConfig(kind="adagrad"), restore_required=True)
    first = store.incarnation
    for attempt in (lambda: store.init({"w": np.zeros((2, 2), np.float32)}), lambda: store.pull(),
                    lambda: store.push({"w": np.ones((2, 2), np.float32)})):  # fmt: skip
        with pytest.raises(Unavailable, match="waiting to be restored"):
            attempt()
    assert store.stats().awaiting_restore
    store.restore(snap.version, snap.tensors, snap.optimizer_state)
    assert not store.awaiting_restore and store.incarnation != first
    np.testing.assert_array_equal(store.pull()[1]["w"], snap.tensors["w"])

    released = DenseStore(restore_required=True)
    released.end_restore_wait()  # no checkpoint yet: the next Init sets the parameters
    assert released.init({"w": np.zeros(1, np.float32)})[0] == 1


class DenseServer:
    def __init__(self) -> None:
        self.port = 0
        self.server: MonolithServer | None = None

    def serve(self, store: DenseStore) -> DenseStore:
        if self.server is not None:
            self.server.stop(grace=0)
        self.server = build_dense_ps(store, ServerConfig(host="127.0.0.1", port=self.port, metrics_port=None))
        self.server.start()
        self.port = self.server.port
        return store


def test_model_serving_keeps_its_dense_parameters_until_a_new_incarnation_is_restored() -> None:
    from monolith.model.config import default_config_path, load_model_config
    from monolith.serving.model import ServingModel
    from monolith.trainer.backends import LocalEmbeddings

    config = load_model_config(default_config_path())
    dense = DenseServer()
    store = dense.serve(DenseStore(config.model.optimizer))
    client = DensePSClient(f"127.0.0.1:{dense.port}", timeout=5)
    try:
        model = ServingModel(config, LocalEmbeddings(config.tables()), client)
        params = model.model.initial_parameters(seed=1)
        store.init(params)
        for _ in range(5):
            store.push({name: np.ones_like(v) for name, v in params.items()})
        snap = store.snapshot()
        assert model.refresh_dense() and model.dense_version == 6
        held = model._dense_state

        restarted = dense.serve(DenseStore(config.model.optimizer, restore_required=True))
        wait_for(lambda: "waiting to be restored" in _refresh_error(model),  # the channel reconnects first
                 "a dense refresh refused by the restarted dense-PS, waiting to be restored", timeout=5)
        assert model._dense_state is held  # still serving the parameters it had

        # Restored to an older cut (version 3 < 6): taken because the incarnation is new.
        older = {name: v - 1 for name, v in snap.tensors.items()}
        restarted.restore(3, older, snap.optimizer_state)
        assert model.refresh_dense() and model.dense_version == 3
        assert model._dense_state is not None
        for name, v in older.items():
            np.testing.assert_array_equal(model._dense_state[1][name], v)
        assert not model.refresh_dense()  # up to date with the new incarnation
    finally:
        client.close()
        assert dense.server is not None
        dense.server.stop(grace=0)


def _refresh_error(model: object) -> str:
    """The error of one dense refresh ("" if it succeeded)."""
    try:
        model.refresh_dense()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - the error text is what is checked
        return str(exc) + (exc.details() if hasattr(exc, "details") else "")
    return ""
