"""The embedding-PS over real gRPC, through the sharded client, on two training shards.

Tests that share `ps_cluster` each use their own id range (the hundreds of thousands
digit), and assert on what their own ids do or on before/after differences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest

from helpers.metrics import metrics_url, read_metrics
from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.common.scrape import Scrape
from monolith.embedding.config import OptimizerConfig, TableConfig
from monolith.embedding_ps.client import ShardedEmbeddingClient
from monolith.trainer.backends import LocalEmbeddings

if TYPE_CHECKING:
    from helpers.cluster import Cluster

SERVICE = "monolith.api.embedding_ps.v1.EmbeddingPS"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _rows_of(cluster: Cluster, name: str) -> list[dict[int, tuple[tuple[float, ...], int]]]:
    return [cluster.rows(i).get(name, {}) for i in range(len(cluster.shards))]


def _table_stats(stats: pb.StatsResponse, name: str) -> pb.TableStats:
    (found,) = [s for s in stats.tables if s.table == name]
    return found


def _stats(cluster: Cluster, shard: int, name: str) -> pb.TableStats:
    return _table_stats(cluster.client.stats()[shard], name)


# ------------------------------------------------------------------------- lookups


def test_lookup_answers_in_input_order_across_shards_with_duplicates(ps_cluster: Cluster) -> None:
    on0 = ps_cluster.ids_on("item", 0, 3, start=100_000)
    on1 = ps_cluster.ids_on("item", 1, 3, start=100_000)
    extremes = np.array([INT64_MIN, -1, INT64_MAX], np.int64)
    ids = np.array([on1[0], on0[0], on1[0], on0[1], on1[1], on0[0], on1[2], on0[2], on0[2]], np.int64)
    ids = np.concatenate([ids, extremes, extremes[::-1]])

    trained = ps_cluster.client.lookup({"item": ids}, training=True)["item"]
    served = ps_cluster.client.lookup({"item": ids}, training=False)["item"]

    assert trained.shape == (ids.shape[0], 8) and trained.dtype == np.float32
    np.testing.assert_array_equal(served, trained)
    exported = _rows_of(ps_cluster, "item")
    owners = ps_cluster.owners("item", ids)
    assert set(owners[:9].tolist()) == {0, 1}
    for i, (id_, owner) in enumerate(zip(ids.tolist(), owners.tolist())):
        assert id_ in exported[owner] and id_ not in exported[1 - owner], id_
        np.testing.assert_array_equal(trained[i], exported[owner][id_][0][:8])
    # Distinct ids got distinct (random) rows, so equal answers mean equal ids.
    same_answer = (trained[:, None, :] == trained[None, :, :]).all(axis=2)
    np.testing.assert_array_equal(same_answer, ids[:, None] == ids[None, :])


def test_lookup_of_several_tables_in_one_call(ps_cluster: Cluster) -> None:
    items = np.concatenate([ps_cluster.ids_on("item", s, 2, start=200_000) for s in (0, 1)])
    tags = np.concatenate([ps_cluster.ids_on("tag", s, 2, start=200_000) for s in (0, 1)])

    both = ps_cluster.client.lookup({"item": items, "tag": tags[::-1]}, training=True)
    item_only = ps_cluster.client.lookup({"item": items})["item"]
    tag_only = ps_cluster.client.lookup({"tag": tags})["tag"]

    assert both["item"].shape == (4, 8) and both["tag"].shape == (4, 4)
    np.testing.assert_array_equal(both["item"], item_only)
    np.testing.assert_array_equal(both["tag"], tag_only[::-1])
    assert np.all(np.abs(both["tag"]).sum(axis=1) > 0)


def test_training_lookup_without_filter_creates_each_row_once(ps_cluster: Cluster) -> None:
    ids = np.concatenate([ps_cluster.ids_on("item", s, 5, start=300_000) for s in (0, 1)])
    admissions = [_stats(ps_cluster, s, "item").admissions for s in (0, 1)]

    first = ps_cluster.client.lookup({"item": np.repeat(ids, 3)}, training=True)["item"]
    again = ps_cluster.client.lookup({"item": ids}, training=True)["item"]

    assert [_stats(ps_cluster, s, "item").admissions - admissions[s] for s in (0, 1)] == [5, 5]
    assert np.all(np.abs(first).sum(axis=1) > 0)
    np.testing.assert_array_equal(first[::3], again)


def test_counting_filter_admits_at_the_threshold(ps_cluster: Cluster) -> None:
    """User ids need 2 occurrences; the client sends an id's count, so 2 in one call admit."""
    once = ps_cluster.ids_on("user", 0, 1, start=400_000)[0]
    twice = ps_cluster.ids_on("user", 1, 1, start=400_000)[0]
    before = [_stats(ps_cluster, s, "user") for s in (0, 1)]

    first = ps_cluster.client.lookup({"user": np.array([twice, once, twice])}, training=True)["user"]

    after = [_stats(ps_cluster, s, "user") for s in (0, 1)]
    assert not first[1].any()
    assert first[0].any()
    np.testing.assert_array_equal(first[0], first[2])
    assert (after[0].pending_ids - before[0].pending_ids, after[0].rows - before[0].rows) == (1, 0)
    assert (after[1].pending_ids - before[1].pending_ids, after[1].rows - before[1].rows) == (0, 1)
    assert once not in ps_cluster.rows(0).get("user", {})

    second = ps_cluster.client.lookup({"user": np.array([once])}, training=True)["user"]

    assert second[0].any()
    assert _stats(ps_cluster, 0, "user").pending_ids == before[0].pending_ids
    np.testing.assert_array_equal(ps_cluster.rows(0)["user"][once][0][:8], second[0])
    served = ps_cluster.client.lookup({"user": np.array([once, twice])})["user"]
    np.testing.assert_array_equal(served, np.stack([second[0], first[0]]))


def test_serving_lookups_of_unknown_ids_read_zeros_and_change_nothing(ps_cluster: Cluster) -> None:
    unknown = {
        name: np.concatenate([ps_cluster.ids_on(name, s, 3, start=500_000) for s in (0, 1)])
        for name in ("user", "item", "tag")
    }
    before = ps_cluster.snapshot()

    served = ps_cluster.client.lookup(unknown, training=False)
    served_again = ps_cluster.client.lookup(unknown, training=False)

    for name, ids in unknown.items():
        assert served[name].shape == (ids.shape[0], ps_cluster.shards[0].tables[name].dim)
        assert not served[name].any() and not served_again[name].any()
    assert ps_cluster.snapshot() == before


# ------------------------------------------------------------------------ gradients


def test_apply_gradients_changes_exactly_the_targeted_rows(ps_cluster: Cluster) -> None:
    tags = np.concatenate([ps_cluster.ids_on("tag", s, 3, start=600_000) for s in (0, 1)])
    items = np.concatenate([ps_cluster.ids_on("item", s, 2, start=600_000) for s in (0, 1)])
    no_row = ps_cluster.ids_on("tag", 1, 1, start=650_000)
    ps_cluster.client.lookup({"tag": tags, "item": items}, training=True)
    (stats_before, rows_before) = ps_cluster.snapshot()
    rng = np.random.default_rng(7)
    tag_ids = np.array([tags[0], tags[3], tags[0], tags[4], no_row[0]])  # tags[0] twice: summed
    tag_grads = rng.normal(size=(5, 4)).astype(np.float32)
    item_ids = items[[0, 3]]
    item_grads = rng.normal(size=(2, 8)).astype(np.float32)

    applied, filtered = ps_cluster.client.apply_gradients(
        {"tag": (tag_ids, tag_grads), "item": (item_ids, item_grads)}, update_time=1_700_000_123
    )

    assert (applied, filtered) == (3 + 2, 1)
    (stats_after, rows_after) = ps_cluster.snapshot()
    t0, t3, t4 = (int(tags[i]) for i in (0, 3, 4))
    expected_tag_grad = {t0: tag_grads[0] + tag_grads[2], t3: tag_grads[1], t4: tag_grads[3]}
    expected_item_grad = dict(zip(item_ids.tolist(), item_grads))
    for shard in (0, 1):
        for name in ("user", "item", "tag"):
            targeted = expected_tag_grad if name == "tag" else expected_item_grad if name == "item" else {}
            before, after = rows_before[shard].get(name, {}), rows_after[shard].get(name, {})
            assert before.keys() == after.keys()
            changed = {id_ for id_ in before if before[id_] != after[id_]}
            assert changed == {id_ for id_ in targeted if id_ in before}, (shard, name)
            for id_ in changed:
                old, new = np.array(before[id_][0], np.float64), np.array(after[id_][0], np.float64)
                g = np.asarray(targeted[id_], np.float64)
                opt = ps_cluster.shards[shard].tables[name].config.optimizer
                if name == "tag":  # sgd
                    np.testing.assert_allclose(new, old - opt.learning_rate * g, rtol=1e-6, atol=1e-7)
                else:  # adagrad: [w | accumulator]
                    acc = old[8:] + g * g
                    np.testing.assert_allclose(new[8:], acc, rtol=1e-6)
                    step = opt.learning_rate * g / (np.sqrt(acc) + opt.epsilon)
                    np.testing.assert_allclose(new[:8], old[:8] - step, rtol=1e-5)
                assert after[id_][1] == 1_700_000_123
    for shard in (0, 1):
        assert stats_after[shard].version == stats_before[shard].version + 1
    filtered_delta = [
        _table_stats(stats_after[s], "tag").filtered_gradients - _table_stats(stats_before[s], "tag").filtered_gradients
        for s in (0, 1)
    ]
    assert filtered_delta == [0, 1]


# ------------------------------------------------------------------- export / import


def _populate(cluster: Cluster, start: int, update_time: float) -> dict[str, np.ndarray]:
    """Creates rows in every table on both shards and moves them off their initial values."""
    ids = {name: np.arange(start, start + 40, dtype=np.int64) for name in ("user", "item", "tag")}
    cluster.client.lookup(
        {name: np.repeat(v, 2) if name == "user" else v for name, v in ids.items()},
        training=True,
        update_time=update_time,
    )
    rng = np.random.default_rng(start)
    cluster.client.apply_gradients(
        {name: (v[::2], rng.normal(size=(v[::2].shape[0], 4 if name == "tag" else 8))) for name, v in ids.items()},
        update_time=update_time,
    )
    return ids


def _copy(source: Cluster, target: Cluster, since: list[int], include_state: bool = True) -> tuple[list[int], int, int]:
    """Streams each shard's export since its version into the same shard of target.

    Returns:
        The version each shard's export is complete up to, and the rows upserted and
        deleted in target.
    """
    versions, upserted, deleted = [], 0, 0
    for shard in range(len(source.shards)):
        chunks = list(source.client.export(shard, since[shard], include_state, max_rows_per_chunk=16))
        assert len({c.version for c in chunks}) == 1
        versions.append(chunks[0].version)
        response = target.client.import_chunks(shard, iter(chunks))
        upserted += response.upserted
        deleted += response.deleted
    return versions, upserted, deleted


def test_export_import_round_trip_into_a_fresh_cluster(make_cluster: Callable[..., Cluster]) -> None:
    source, replica = make_cluster(), make_cluster()
    t1 = 1_700_000_000
    ids = _populate(source, 0, update_time=t1)
    all_ids = {name: np.concatenate([v, v + 1000]) for name, v in ids.items()}  # with unknown ids

    versions, upserted, deleted = _copy(source, replica, since=[0, 0])

    assert (upserted, deleted) == (3 * 40, 0)
    assert versions == [s.version for s in source.shards]
    assert [replica.rows(i) for i in (0, 1)] == [source.rows(i) for i in (0, 1)]
    _assert_same_lookups(source, replica, all_ids)

    # More changes: new rows, updates of old ones, and an expiry of old tag rows.
    t2 = t1 + 1000
    new_ids = _populate(source, 100, update_time=t2)
    source.client.apply_gradients({"item": (ids["item"][:3], np.ones((3, 8), np.float32))}, update_time=t2)
    evicted = sum(shard.expire()["tag"] for shard in source.shards)
    assert evicted == 40  # every tag row of t1; those of t2 stay
    changed = [source.rows(i) for i in (0, 1)]

    _, upserted, deleted = _copy(source, replica, since=versions)

    assert (upserted, deleted) == (3 * 40 + 3, 40)
    assert [replica.rows(i) for i in (0, 1)] == changed
    _assert_same_lookups(source, replica, {s: np.concatenate([all_ids[s], new_ids[s]]) for s in all_ids})
    assert not replica.client.lookup({"tag": ids["tag"]})["tag"].any()


def _assert_same_lookups(a: Cluster, b: Cluster, ids: dict[str, np.ndarray]) -> None:
    got_a, got_b = a.client.lookup(ids), b.client.lookup(ids)
    for name in ids:
        np.testing.assert_array_equal(got_a[name], got_b[name])


def test_import_with_optimizer_state_continues_training_identically(make_cluster: Callable[..., Cluster]) -> None:
    source, replica = make_cluster(), make_cluster()
    ids = _populate(source, 0, update_time=1_700_000_000)
    _copy(source, replica, since=[0, 0])
    grads = {name: (v, np.full((40, 4 if name == "tag" else 8), 0.3, np.float32)) for name, v in ids.items()}

    for cluster in (source, replica):
        assert cluster.client.apply_gradients(grads, update_time=1_700_000_500) == (3 * 40, 0)

    assert [replica.rows(i) for i in (0, 1)] == [source.rows(i) for i in (0, 1)]


def test_incremental_export_holds_only_changes_since_the_version(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    _populate(cluster, 0, update_time=1_700_000_000)
    version = cluster.client.stats()[0].version
    touched = cluster.ids_on("item", 0, 3, start=0)
    assert touched.max() < 40
    cluster.client.apply_gradients({"item": (touched, np.ones((3, 8), np.float32))})

    chunks = list(cluster.client.export(0, since_version=version))
    nothing = list(cluster.client.export(0, since_version=cluster.shards[0].version))

    exported = {c.table: set(c.rows.ids.tolist()) for c in chunks}
    assert exported == {"item": set(touched.tolist())}
    assert {c.version for c in chunks} == {version + 1}
    assert {c.incarnation for c in chunks} == {cluster.shards[0].incarnation}
    assert all(c.rows.values.shape[1] == 8 and not c.includes_optimizer_state for c in chunks)
    assert nothing == []


def test_export_splits_into_chunks_and_filters_tables(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    _populate(cluster, 0, update_time=1_700_000_000)
    request = pb.ExportRequest(max_rows_per_chunk=3, tables=["tag", "item"], include_optimizer_state=True)

    chunks = list(cluster.stubs[1].Export(request, timeout=10))

    assert [c.table for c in chunks] == sorted((c.table for c in chunks), key=["tag", "item"].index)
    assert all(1 <= c.num_rows <= 3 for c in chunks)
    assert {c.table: c.width for c in chunks} == {"tag": 4, "item": 16}
    full = cluster.rows(1)
    assert sum(c.num_rows for c in chunks) == len(full["tag"]) + len(full["item"])


def test_serving_shard_serves_what_the_training_shards_export(
    make_cluster: Callable[..., Cluster], serving_shard: Cluster
) -> None:
    """A 1-shard serving replica takes every training shard's embeddings (no optimizer state).

    Clients cannot write to a serving shard, so the chunks are applied the way its own
    sync applies them.
    """
    source = make_cluster()
    ids = _populate(source, 0, update_time=1_700_000_000)
    unknown = {name: v + 5000 for name, v in ids.items()}
    version_before = serving_shard.client.stats()[0].version
    assert not any(serving_shard.client.lookup(ids)[s].any() for s in ids)

    upserted = 0
    for shard in (0, 1):
        chunks = list(source.client.export(shard, include_optimizer_state=False))
        assert all(c.rows.values.shape[1] == source.shards[0].tables[c.table].dim for c in chunks)
        for c in source.shards[shard].export(0, include_state=False):
            upserted += serving_shard.shards[0].apply_synced_chunk(c.table, c.rows, c.deleted_ids)[0]

    assert upserted == 3 * 40
    _assert_same_lookups(source, serving_shard, ids)
    stats = serving_shard.client.stats()[0]
    assert (stats.role, stats.num_shards) == ("serving", 1)
    assert [s.rows for s in stats.tables] == [40, 40, 40]
    assert stats.version > version_before
    after = serving_shard.snapshot()
    served = serving_shard.client.lookup(unknown)
    assert not any(served[s].any() for s in unknown)
    assert serving_shard.snapshot() == after


# ---------------------------------------------------------------------- stats, metrics


def test_stats_report_each_shard_and_table(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    u0, u1 = (cluster.ids_on("user", s, 1, start=0)[0] for s in (0, 1))
    i0, i1 = (cluster.ids_on("item", s, 1, start=0)[0] for s in (0, 1))
    t0, t1 = (cluster.ids_on("tag", s, 1, start=0)[0] for s in (0, 1))
    cluster.client.lookup(
        {"user": np.array([u0, u0, u1]), "item": np.array([i0, i1]), "tag": np.array([t0])}, training=True
    )
    cluster.client.apply_gradients({"tag": (np.array([t0, t1]), np.ones((2, 4), np.float32))})
    cluster.shards[0].expire(now=2.0**32)  # evicts every tag row of shard 0

    stats = cluster.client.stats()

    assert [(s.shard, s.num_shards, s.role) for s in stats] == [(0, 2, "training"), (1, 2, "training")]
    assert [s.version for s in stats] == [3, 2]  # lookup, gradients (+ the expiry sweep on shard 0)
    columns = ("table", "rows", "admissions", "pending_ids", "filtered_gradients", "evictions")
    table = [[tuple(getattr(s, c) for c in columns) for s in shard.tables] for shard in stats]
    assert table == [
        [("user", 1, 1, 0, 0, 0), ("item", 1, 1, 0, 0, 0), ("tag", 0, 1, 0, 0, 1)],
        [("user", 0, 0, 1, 0, 0), ("item", 1, 1, 0, 0, 0), ("tag", 0, 0, 0, 1, 0)],
    ]
    assert all(s.bytes > 0 for shard in stats for s in shard.tables)


def _scrape(port: int) -> Scrape:
    return read_metrics(metrics_url(port), timeout=10)


def _values(page: Scrape, name: str, **labels: str) -> list[float]:
    """Every series of `name` with those labels: the shards of earlier tests' clusters may still be collected, and
    carry the same labels, until they are garbage-collected."""
    return [s.value for s in page.matching(name, **labels)]


def _handled(page: Scrape, method: str) -> float:
    return page.sum("grpc_server_handling_seconds_count", grpc_service=SERVICE, grpc_method=method)


def test_metrics_endpoint_shows_entriesand_rpc_latencies(ps_cluster: Cluster) -> None:
    port = ps_cluster.servers[0].metrics_port
    assert port
    before = _scrape(port)
    ids = ps_cluster.ids_on("item", 0, 4, start=700_000)
    ps_cluster.client.lookup({"item": ids}, training=True)
    ps_cluster.client.apply_gradients({"item": (ids, np.ones((4, 8), np.float32))})
    list(ps_cluster.client.export(0, since_version=ps_cluster.shards[0].version))
    ps_cluster.client.import_chunks(0, iter([]))

    after = _scrape(port)

    stats = ps_cluster.client.stats()[0]  # the Stats RPC after the scrape: its latency is not in `after`
    for s in stats.tables:
        labels = {"role": "training", "shard": "0", "table": s.table}
        assert s.rows in _values(after, "monolith_embedding_rows", **labels), s.table
        assert s.bytes in _values(after, "monolith_embedding_table_bytes", **labels), s.table
        assert s.admissions in _values(after, "monolith_embedding_admissions_total", **labels), s.table
    assert _values(after, "monolith_embedding_rows", role="training", shard="1", table="item")
    for method in ("Lookup", "ApplyGradients", "Export", "Import"):
        assert _handled(after, method) >= _handled(before, method) + 1, method
    assert _handled(_scrape(port), "Stats") >= 1
    bucket = _values(after, "grpc_server_handling_seconds_bucket", grpc_method="Lookup", le="0.0001")
    assert bucket, "sub-millisecond latency bucket missing"


def test_client_rejects_a_table_it_does_not_know_before_calling(ps_cluster: Cluster) -> None:
    with pytest.raises(ValueError, match=r"unknown table 'nope'"):
        ps_cluster.client.lookup({"item": np.array([1]), "nope": np.array([1])})


# ------------------------------------------------------------- gradient accumulation


def test_per_occurrence_squares_travel_only_for_tables_that_accumulate_them(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Ids repeated in one push: the sharded client sends the sum of squares for a table whose
    Adagrad accumulates occurrences, so its shards end with the rows in-process training
    (LocalEmbeddings) computes; a table accumulating sums gets the square of the sum."""
    adagrad = OptimizerConfig(kind="adagrad", learning_rate=0.2, initial_accumulator=0.1)
    tables = (TableConfig(name="occ", dim=4, optimizer=adagrad.model_copy(update={"accumulate": "occurrences"})),
              TableConfig(name="sums", dim=4, optimizer=adagrad))  # fmt: skip
    cluster = make_cluster(num_shards=2, tables=tables)
    local = LocalEmbeddings(tables)
    # The "occ" table as it would be if it accumulated sums.
    all_sums = LocalEmbeddings(tuple(t.model_copy(update={"optimizer": adagrad}) for t in tables))
    client = ShardedEmbeddingClient(cluster.addresses, {t.name: t.dim for t in tables}, timeout=10,
                                    occurrence_tables={"occ"})  # fmt: skip
    try:
        ids = np.array([5, 9, 5, 5, 11, 9], np.int64)
        grads = np.random.default_rng(3).normal(0, 1, (len(ids), 4)).astype(np.float32)
        for backend in (client, local, all_sums):
            backend.lookup({"occ": ids, "sums": ids}, training=True, update_time=10.0)
            backend.apply_gradients({"occ": (ids, grads), "sums": (ids, grads)}, update_time=11.0)

        unique = np.array([5, 9, 11], np.int64)
        served = client.lookup({"occ": unique, "sums": unique})
        expected = local.lookup({"occ": unique, "sums": unique})
        for name in ("occ", "sums"):
            np.testing.assert_allclose(served[name], expected[name], rtol=1e-6, atol=1e-7)
        # The two rules differ for the repeated ids (5 three times, 9 twice), not for 11.
        moved = np.abs(served["occ"] - all_sums.lookup({"occ": unique})["occ"]).sum(axis=1)
        assert moved[0] > 1e-4 and moved[1] > 1e-4 and moved[2] < 1e-7, moved
    finally:
        client.close()


def test_a_lookup_riding_with_gradients_answers_as_the_two_calls_in_order(
    make_cluster: Callable[..., Cluster],
) -> None:
    """apply_and_lookup against one cluster, apply_gradients then lookup against another: the
    same rows answered and the same tables after, optimizer state and admission counts
    included; a shard with only gradients, or only ids to look up, gets only those."""
    sequential, riding = make_cluster(num_shards=2), make_cluster(num_shards=2)
    users = sequential.ids_on("user", 0, 4, start=500)  # gradients on shard 0 only
    items = sequential.ids_on("item", 1, 3, start=500)  # looked up on shard 1 only
    for cluster in (sequential, riding):
        cluster.client.lookup({"user": np.repeat(users, 2)}, training=True, update_time=100.0)  # admitted (2)
    grads = np.random.default_rng(2).normal(0, 1, (len(users), 8)).astype(np.float32)
    then = {"user": np.concatenate([users[:2], users[:1]]), "item": items, "tag": np.array([7, 8, 7], np.int64)}

    sequential.client.apply_gradients({"user": (users, grads)}, update_time=101.0)
    expected = sequential.client.lookup(then, training=True, update_time=102.0)
    applied, filtered, rows = riding.client.apply_and_lookup({"user": (users, grads)}, 101.0, then, True, 102.0)

    assert (applied, filtered) == (len(users), 0)
    assert rows.keys() == expected.keys()
    for name in then:
        np.testing.assert_array_equal(rows[name], expected[name], err_msg=name)
    assert [riding.rows(i) for i in range(2)] == [sequential.rows(i) for i in range(2)]
