"""Bad requests to a real embedding-PS shard, sent with the raw stub.

Every rejection is checked three ways: the exact status code, a message that names the
problem, and a server that afterwards holds exactly the tables it held before (full
export with optimizer state, and Stats) and still answers correctly.

Rejected training lookups use ids the shard has never seen and rejected gradients and
imports use ids it has rows for, so wrongly accepting any of them would change a table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.embedding.table import RowBatch

if TYPE_CHECKING:
    from helpers.cluster import Cluster

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
TRAINING, SERVING = pb.LOOKUP_MODE_TRAINING, pb.LOOKUP_MODE_SERVING
MIB = 1024 * 1024


def _id_bytes(ids: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(ids, "<i8").tobytes()


def _ids(
    name: str, ids: Sequence[int] | np.ndarray, num_ids: int | None = None, counts: Sequence[int] | None = None
) -> pb.TableIds:
    return pb.TableIds(
        table=name,
        num_ids=len(ids) if num_ids is None else num_ids,
        ids=_id_bytes(ids),
        counts=b"" if counts is None else np.asarray(counts, "<i4").tobytes(),
    )


def _grads(
    name: str, ids: Sequence[int] | np.ndarray, grads: np.ndarray, num_ids: int | None = None, dim: int | None = None,
    squares: np.ndarray | None = None,
) -> pb.TableGradients:  # fmt: skip
    grads = np.asarray(grads, "<f4")
    return pb.TableGradients(
        table=name,
        num_ids=len(ids) if num_ids is None else num_ids,
        ids=_id_bytes(ids),
        dim=grads.shape[-1] if dim is None else dim,
        gradients=grads.tobytes(),
        squared_gradients=b"" if squares is None else np.asarray(squares, "<f4").tobytes(),
    )


def _chunk(
    name: str, ids: Sequence[int] | np.ndarray, values: np.ndarray, width: int | None = None, **fields: Any
) -> pb.RowChunk:
    values = np.asarray(values, "<f4")
    chunk = pb.RowChunk(
        table=name,
        num_rows=len(ids),
        width=values.shape[-1] if width is None else width,
        ids=_id_bytes(ids),
        values=values.tobytes(),
        update_times=np.full(len(ids), 1_700_000_000, "<u4").tobytes(),
    )
    for name, value in fields.items():
        setattr(chunk, name, value)
    return chunk


@dataclasses.dataclass(frozen=True)
class Ids:
    """Ids of `ps_cluster` for the bad requests; all sent to shard 0."""

    new: dict[str, np.ndarray]  # route to shard 0, no row anywhere
    known: dict[str, np.ndarray]  # route to shard 0, have a row
    foreign: dict[str, np.ndarray]  # route to shard 1
    answers: dict[str, np.ndarray]  # serving lookups of every seeded id, both shards


@pytest.fixture(scope="module")
def ids(ps_cluster: Cluster) -> Ids:
    """Seeds both shards with rows (trained a little) and pending ids, and picks ids."""
    seeded = {name: np.arange(1, 61, dtype=np.int64) for name in ("user", "item", "tag")}
    client = ps_cluster.client
    client.lookup({"user": np.repeat(seeded["user"], 2), "item": seeded["item"], "tag": seeded["tag"]}, training=True)
    client.lookup({"user": np.arange(1000, 1010)}, training=True)  # pending, not admitted
    client.apply_gradients(
        {s: (v[::3], np.full((20, 4 if s == "tag" else 8), 0.25, np.float32)) for s, v in seeded.items()}
    )
    owners = {s: ps_cluster.owners(s, v) for s, v in seeded.items()}
    return Ids(
        new={s: ps_cluster.ids_on(s, 0, 4, start=900_000) for s in seeded},
        known={s: v[owners[s] == 0][:4] for s, v in seeded.items()},
        foreign={s: v[owners[s] == 1][:4] for s, v in seeded.items()},
        answers=client.lookup(seeded),
    )


def _assert_rejected(
    cluster: Cluster, ids: Ids | None, call: Callable[[], object], code: grpc.StatusCode, *fragments: str
) -> None:
    """Runs a call that must fail; checks status, message, unchanged tables, still serving."""
    before = cluster.snapshot()
    with pytest.raises(grpc.RpcError) as info:
        call()
    details = info.value.details()
    assert info.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    assert cluster.snapshot() == before
    if ids is not None:
        answers = cluster.client.lookup({s: np.arange(1, 61) for s in ids.answers})
        for name, expected in ids.answers.items():
            np.testing.assert_array_equal(answers[name], expected)


# --------------------------------------------------------------------------- Lookup

# A bad table entry: (name, builder from the ids, code, message fragments).
BAD_SLOT_IDS: list[tuple[str, Callable[[Ids], pb.TableIds], grpc.StatusCode, tuple[str, ...]]] = [
    ("unknown table", lambda i: _ids("nope", i.new["item"]), INVALID,
     ("unknown table 'nope'", "item, tag, user")),
    ("id of another shard", lambda i: _ids("item", [*i.new["item"], i.foreign["item"][0]]), INVALID,
     ("table 'item'", "1 id(s) belong to other shards", "belongs to shard 1, not 0")),
    ("ids shorter than num_ids", lambda i: _ids("item", i.new["item"][:2], num_ids=3), INVALID,
     ("table 'item' ids", "expected 24 bytes", "got 16")),
    ("ids longer than num_ids", lambda i: _ids("item", i.new["item"][:3], num_ids=2), INVALID,
     ("table 'item' ids", "expected 16 bytes", "got 24")),
    ("negative num_ids", lambda i: _ids("item", [], num_ids=-1), INVALID,
     ("table 'item' ids", "negative size")),
    ("absurd num_ids", lambda i: _ids("item", i.new["item"][:1], num_ids=2**40), EXHAUSTED,
     ("table 'item'", "1099511627776 ids", "max_ids_per_request=1000000")),
    ("zero count", lambda i: _ids("user", i.new["user"][:2], counts=[2, 0]), INVALID,
     ("table 'user'", "occurrence counts must be >= 1, got 0")),
    ("negative count", lambda i: _ids("user", i.new["user"][:2], counts=[-3, 5]), INVALID,
     ("table 'user'", "occurrence counts must be >= 1, got -3")),
    ("counts shorter than ids", lambda i: _ids("user", i.new["user"][:3], counts=[2, 2]), INVALID,
     ("table 'user' counts", "expected 12 bytes", "got 8")),
]  # fmt: skip


def _lookup(cluster: Cluster, entries: list[pb.TableIds], mode: int = TRAINING, update_time: float = 0.0) -> Callable:
    request = pb.LookupRequest(tables=entries, mode=mode, update_time=update_time)
    return lambda: cluster.stubs[0].Lookup(request, timeout=10)


@pytest.mark.parametrize("mode", [TRAINING, SERVING], ids=["training", "serving"])
@pytest.mark.parametrize(("bad", "code", "fragments"), [c[1:] for c in BAD_SLOT_IDS], ids=[c[0] for c in BAD_SLOT_IDS])
def test_lookup_rejects_bad_table_ids(
    ps_cluster: Cluster, ids: Ids, bad: Callable[[Ids], pb.TableIds], code: grpc.StatusCode,
    fragments: tuple[str, ...], mode: int,
) -> None:  # fmt: skip
    _assert_rejected(ps_cluster, ids, _lookup(ps_cluster, [bad(ids)], mode), code, *fragments)


@pytest.mark.parametrize(("bad", "code", "fragments"), [c[1:] for c in BAD_SLOT_IDS], ids=[c[0] for c in BAD_SLOT_IDS])
def test_lookup_with_only_the_second_table_bad_changes_nothing(
    ps_cluster: Cluster, ids: Ids, bad: Callable[[Ids], pb.TableIds], code: grpc.StatusCode,
    fragments: tuple[str, ...],
) -> None:  # fmt: skip
    good = _ids("tag", ids.new["tag"])  # would create rows if applied
    _assert_rejected(ps_cluster, ids, _lookup(ps_cluster, [good, bad(ids)]), code, *fragments)


def test_lookup_rejects_an_unspecified_mode(ps_cluster: Cluster, ids: Ids) -> None:
    call = _lookup(ps_cluster, [_ids("item", ids.new["item"])], mode=pb.LOOKUP_MODE_UNSPECIFIED)

    _assert_rejected(ps_cluster, ids, call, INVALID, "mode must be LOOKUP_MODE_TRAINING or LOOKUP_MODE_SERVING")


def test_a_table_name_of_100k_characters_is_echoed_cut_and_keeps_its_status(ps_cluster: Cluster, ids: Ids) -> None:
    """Regression: the whole name went into the status message, past gRPC's metadata limit,
    and the client saw RESOURCE_EXHAUSTED "Stream removed" instead of INVALID_ARGUMENT."""
    name = "s" * 100_000
    chunk = _chunk(name, ids.known["item"][:1], np.ones((1, 8)))

    for call in (_lookup(ps_cluster, [_ids(name, ids.new["item"])], SERVING),
                 lambda: ps_cluster.stubs[0].Import(iter([chunk]), timeout=10)):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == INVALID, info.value.details()
        details = info.value.details()
        assert len(details) <= 512 and "unknown table 'sss" in details
        assert "(100002 characters)" in details or "chars cut" in details  # cut where echoed, or as a whole
        assert details.endswith("this shard has: item, tag, user")


def test_lookup_rejects_a_table_given_twice(ps_cluster: Cluster, ids: Ids) -> None:
    entries = [_ids("item", ids.new["item"][:2]), _ids("tag", ids.new["tag"]), _ids("item", ids.new["item"][2:])]

    _assert_rejected(ps_cluster, ids, _lookup(ps_cluster, entries), INVALID, "table 'item' appears more than once")


@pytest.mark.parametrize(("update_time", "shown"), [(float("nan"), "nan"), (float("inf"), "inf"), (-1.0, "-1.0")])
def test_training_lookup_rejects_a_bad_update_time(
    ps_cluster: Cluster, ids: Ids, update_time: float, shown: str
) -> None:
    call = _lookup(ps_cluster, [_ids("item", ids.new["item"])], update_time=update_time)

    _assert_rejected(ps_cluster, ids, call, INVALID, "update_time must be a finite number of seconds >= 0", shown)


def test_lookup_with_an_unknown_mode_value_is_rejected(ps_cluster: Cluster, ids: Ids) -> None:
    """A mode outside the enum (here 3) is INVALID_ARGUMENT, not served as SERVING.

    Regression: the servicer once rejected only LOOKUP_MODE_UNSPECIFIED and treated every
    other non-TRAINING value as a serving lookup, so a client built against a newer proto
    (or a corrupt message) silently got read-only answers.
    """
    call = _lookup(ps_cluster, [_ids("item", ids.known["item"])], mode=3)

    _assert_rejected(ps_cluster, ids, call, INVALID, "mode")


def test_a_table_given_twice_once_without_ids_is_rejected(ps_cluster: Cluster, ids: Ids) -> None:
    """The proto says a table may appear at most once, even when a repeat carries no ids.

    Regression: the shard once counted only repeats that carried ids, so
    [item: 2 ids, item: 0 ids] was accepted and answered with two `item` entries.
    """
    entries = [_ids("item", ids.known["item"][:2]), _ids("item", [])]

    _assert_rejected(ps_cluster, ids, _lookup(ps_cluster, entries, mode=SERVING), INVALID, "more than once")


# ------------------------------------------------------------------- ApplyGradients

BAD_SLOT_GRADIENTS: list[tuple[str, Callable[[Ids], pb.TableGradients], grpc.StatusCode, tuple[str, ...]]] = [
    ("unknown table", lambda i: _grads("nope", i.known["item"][:2], np.ones((2, 8))), INVALID,
     ("unknown table 'nope'",)),
    ("id of another shard", lambda i: _grads("item", [i.known["item"][0], i.foreign["item"][0]], np.ones((2, 8))),
     INVALID, ("table 'item'", "1 id(s) belong to other shards", "belongs to shard 1, not 0")),
    ("ids shorter than num_ids", lambda i: _grads("item", i.known["item"][:1], np.ones((2, 8)), num_ids=2), INVALID,
     ("table 'item' ids", "expected 16 bytes", "got 8")),
    ("negative num_ids", lambda i: _grads("item", [], np.ones((0, 8)), num_ids=-2), INVALID,
     ("table 'item' ids", "negative size")),
    ("absurd num_ids", lambda i: _grads("item", i.known["item"][:1], np.ones((1, 8)), num_ids=2**40), EXHAUSTED,
     ("table 'item'", "1099511627776 ids", "max_ids_per_request=1000000")),
    ("wrong dim", lambda i: _grads("item", i.known["item"][:2], np.ones((2, 5))), INVALID,
     ("table 'item'", "gradients of shape (2, 5)", "2 ids x dim 8")),
    ("negative dim", lambda i: _grads("item", i.known["item"][:2], np.ones((0, 8)), dim=-8), INVALID,
     ("table 'item' gradients", "negative size")),
    ("gradients shorter than ids x dim", lambda i: _grads("item", i.known["item"][:2], np.ones((1, 8)), dim=8),
     INVALID, ("table 'item' gradients", "expected 64 bytes", "got 32")),
    ("gradients longer than ids x dim", lambda i: _grads("item", i.known["item"][:2], np.ones((3, 8)), dim=8),
     INVALID, ("table 'item' gradients", "expected 64 bytes", "got 96")),
    ("NaN gradient", lambda i: _grads("item", i.known["item"][:2], _with(np.ones((2, 8)), (1, 3), np.nan)), INVALID,
     ("table 'item' gradients", "1 non-finite value(s)", "first at index (1, 3)")),
    ("+Inf gradient", lambda i: _grads("tag", i.known["tag"][:2], _with(np.ones((2, 4)), (0, 2), np.inf)), INVALID,
     ("table 'tag' gradients", "1 non-finite value(s)", "first at index (0, 2)")),
    ("-Inf gradient", lambda i: _grads("tag", i.known["tag"][:2], _with(np.ones((2, 4)), (1, 0), -np.inf)), INVALID,
     ("table 'tag' gradients", "1 non-finite value(s)", "first at index (1, 0)")),
    ("squares shorter than ids x dim", lambda i: _grads("item", i.known["item"][:2], np.ones((2, 8)),
                                                        squares=np.ones((1, 8))),
     INVALID, ("table 'item' squared_gradients", "expected 64 bytes", "got 32")),
    ("NaN square", lambda i: _grads("item", i.known["item"][:2], np.ones((2, 8)),
                                    squares=_with(np.ones((2, 8)), (0, 1), np.nan)),
     INVALID, ("table 'item' squared_gradients", "1 non-finite value(s)", "first at index (0, 1)")),
    ("negative square", lambda i: _grads("item", i.known["item"][:2], np.ones((2, 8)),
                                         squares=_with(np.ones((2, 8)), (1, 1), -1.0)),
     INVALID, ("table 'item'", "squared_gradients must be >= 0")),
]  # fmt: skip


def _with(array: np.ndarray, index: tuple[int, int], value: float) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


def _apply(cluster: Cluster, entries: list[pb.TableGradients], update_time: float = 0.0) -> Callable:
    request = pb.ApplyGradientsRequest(tables=entries, update_time=update_time)
    return lambda: cluster.stubs[0].ApplyGradients(request, timeout=10)


@pytest.mark.parametrize(
    ("bad", "code", "fragments"), [c[1:] for c in BAD_SLOT_GRADIENTS], ids=[c[0] for c in BAD_SLOT_GRADIENTS]
)
def test_apply_gradients_rejects_bad_table_gradients(
    ps_cluster: Cluster, ids: Ids, bad: Callable[[Ids], pb.TableGradients], code: grpc.StatusCode,
    fragments: tuple[str, ...],
) -> None:  # fmt: skip
    _assert_rejected(ps_cluster, ids, _apply(ps_cluster, [bad(ids)]), code, *fragments)


@pytest.mark.parametrize(
    ("bad", "code", "fragments"), [c[1:] for c in BAD_SLOT_GRADIENTS], ids=[c[0] for c in BAD_SLOT_GRADIENTS]
)
def test_apply_gradients_with_only_the_second_table_bad_changes_nothing(
    ps_cluster: Cluster, ids: Ids, bad: Callable[[Ids], pb.TableGradients], code: grpc.StatusCode,
    fragments: tuple[str, ...],
) -> None:  # fmt: skip
    good = _grads("user", ids.known["user"], np.full((4, 8), 0.5))
    _assert_rejected(ps_cluster, ids, _apply(ps_cluster, [good, bad(ids)]), code, *fragments)


def test_apply_gradients_rejects_a_table_given_twice(ps_cluster: Cluster, ids: Ids) -> None:
    known = ids.known["tag"]
    entries = [_grads("tag", known[:2], np.ones((2, 4))), _grads("tag", known[2:], np.ones((2, 4)))]

    _assert_rejected(ps_cluster, ids, _apply(ps_cluster, entries), INVALID, "table 'tag' appears more than once")


def test_apply_gradients_rejects_a_nan_update_time(ps_cluster: Cluster, ids: Ids) -> None:
    call = _apply(ps_cluster, [_grads("tag", ids.known["tag"], np.ones((4, 4)))], update_time=float("nan"))

    _assert_rejected(ps_cluster, ids, call, INVALID, "update_time must be a finite number", "nan")


# --------------------------------------------------------------------------- Import

BAD_CHUNKS: list[tuple[str, Callable[[Ids], pb.RowChunk], tuple[str, ...]]] = [
    ("unknown table", lambda i: _chunk("nope", i.known["item"], np.ones((4, 8))), ("unknown table 'nope'",)),
    ("wrong width", lambda i: _chunk("item", i.known["item"], np.ones((4, 5))),
     ("table 'item'", "width 5", "embedding dim 8", "full row width 16")),
    ("values shorter than rows x width", lambda i: _chunk("item", i.known["item"], np.ones((3, 8)), width=8),
     ("table 'item' values", "expected 128 bytes", "got 96")),
    ("NaN value", lambda i: _chunk("item", i.known["item"], _with(np.ones((4, 16)), (2, 11), np.nan)),
     ("table 'item' values", "1 non-finite value(s)", "first at index (2, 11)")),
    ("Inf value", lambda i: _chunk("tag", i.known["tag"], _with(np.ones((4, 4)), (0, 0), np.inf)),
     ("table 'tag' values", "1 non-finite value(s)")),
    ("update_times of wrong length",
     lambda i: _chunk("item", i.known["item"], np.ones((4, 8)), update_times=b"\0" * 12),
     ("table 'item' update_times", "expected 16 bytes", "got 12")),
    ("id of another shard", lambda i: _chunk("item", [*i.known["item"], i.foreign["item"][0]], np.ones((5, 8))),
     ("table 'item'", "belong to other shards")),
    ("deleted id of another shard",
     lambda i: _chunk("item", i.known["item"], np.ones((4, 8)), num_deleted=1,
                      deleted_ids=_id_bytes(i.foreign["item"][:1])),
     ("table 'item'", "belong to other shards")),
    ("deleted_ids of wrong length",
     lambda i: _chunk("item", [], np.ones((0, 8)), num_deleted=2, deleted_ids=_id_bytes(i.known["item"][:1])),
     ("table 'item' deleted_ids", "expected 16 bytes", "got 8")),
    ("negative num_rows", lambda i: _chunk("item", [], np.ones((0, 8)), num_rows=-1),
     ("table 'item' ids", "negative size")),
]  # fmt: skip



@pytest.mark.parametrize(("bad", "fragments"), [c[1:] for c in BAD_CHUNKS], ids=[c[0] for c in BAD_CHUNKS])
def test_import_rejects_bad_chunks(
    ps_cluster: Cluster, ids: Ids, bad: Callable[[Ids], pb.RowChunk], fragments: tuple[str, ...]
) -> None:
    chunk = bad(ids)

    _assert_rejected(ps_cluster, ids, lambda: ps_cluster.stubs[0].Import(iter([chunk]), timeout=10), INVALID,
                     *fragments)  # fmt: skip


def test_import_stream_with_a_bad_later_chunk_names_it_and_what_was_applied(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Import applies chunk by chunk, each all or nothing (as the proto documents): a bad
    second chunk fails the call naming that chunk and what was applied before it, leaves
    the first chunk applied and nothing of the second; a retry of the good part is harmless."""
    cluster = make_cluster(num_shards=1)
    cluster.client.lookup({"item": np.arange(4)}, training=True)
    good = _chunk("item", np.arange(4), np.full((4, 8), 7.0))
    bad = _chunk("item", np.arange(4), _with(np.ones((4, 8)), (0, 0), np.nan))

    with pytest.raises(grpc.RpcError) as caught:
        cluster.stubs[0].Import(iter([good, bad]), timeout=10)
    assert caught.value.code() == INVALID
    details = caught.value.details()
    assert "import chunk 1 (4 rows, 0 deletions applied before it)" in details and "non-finite" in details
    rows = cluster.client.lookup({"item": np.arange(4)})["item"]
    np.testing.assert_array_equal(rows, np.full((4, 8), 7.0, np.float32))
    cluster.stubs[0].Import(iter([good]), timeout=10)
    np.testing.assert_array_equal(cluster.client.lookup({"item": np.arange(4)})["item"], rows)


# --------------------------------------------------------------------------- Export


@pytest.mark.parametrize(
    ("request_", "fragments"),
    [
        (pb.ExportRequest(since_version=-1), ("since_version must be >= 0, got -1",)),
        (pb.ExportRequest(max_rows_per_chunk=-5), ("max_rows_per_chunk must be >= 0, got -5",)),
        (pb.ExportRequest(tables=["item", "nope"]), ("unknown table 'nope'",)),
    ],
    ids=["negative since_version", "negative max_rows_per_chunk", "unknown table"],
)
def test_export_rejects_bad_requests(
    ps_cluster: Cluster, ids: Ids, request_: pb.ExportRequest, fragments: tuple[str, ...]
) -> None:
    _assert_rejected(ps_cluster, ids, lambda: list(ps_cluster.stubs[0].Export(request_, timeout=10)), INVALID,
                     *fragments)  # fmt: skip


# ------------------------------------------------------------------- server limits


def test_request_over_the_message_limit_is_resource_exhausted(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(num_shards=1, max_message_bytes=MIB)
    cluster.client.lookup({"item": np.arange(10)}, training=True)
    known = cluster.client.lookup({"item": np.arange(10)})["item"]
    big = _ids("item", np.arange(1000, 1000 + 140_000))  # 1.12 MB of ids
    assert big.ByteSize() > MIB

    _assert_rejected(cluster, None, _lookup(cluster, [big]), EXHAUSTED, "larger than max", str(MIB))

    np.testing.assert_array_equal(cluster.client.lookup({"item": np.arange(10)})["item"], known)


def test_max_ids_per_request_is_enforced(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(num_shards=1, max_ids_per_request=100)
    limit = "the limit is max_ids_per_request=100"

    _assert_rejected(cluster, None, _lookup(cluster, [_ids("item", np.arange(101))]), EXHAUSTED, "101 ids", limit)
    split = [_ids("item", np.arange(60)), _ids("tag", np.arange(60))]
    _assert_rejected(cluster, None, _lookup(cluster, split), EXHAUSTED, "120 ids", limit)
    _assert_rejected(cluster, None, _lookup(cluster, split, mode=SERVING), EXHAUSTED, "120 ids", limit)

    cluster.stubs[0].Lookup(pb.LookupRequest(tables=[_ids("item", np.arange(100))], mode=TRAINING), timeout=10)
    assert cluster.client.stats()[0].tables[1].rows == 100
    gradients = [_grads("item", np.arange(101), np.ones((101, 8)))]
    _assert_rejected(cluster, None, _apply(cluster, gradients), EXHAUSTED, "101 ids", limit)
    rows = [_chunk("item", np.arange(101), np.ones((101, 8)))]
    _assert_rejected(cluster, None, lambda: cluster.stubs[0].Import(iter(rows), timeout=10), EXHAUSTED, limit)


def _synced(cluster: Cluster, name: str, ids: np.ndarray, values: np.ndarray) -> None:
    """Rows written into a serving shard the way its own sync writes them."""
    rows = RowBatch(np.asarray(ids, np.int64), np.asarray(values, np.float32), np.zeros(len(ids), np.uint32))
    cluster.shards[0].apply_synced_chunk(name, rows, np.zeros(0, np.int64))


def test_serving_shard_refuses_training_lookups_and_gradients(serving_shard: Cluster) -> None:
    _synced(serving_shard, "item", np.arange(5), np.full((5, 8), 0.5))
    serving = "shard 0 has role 'serving'"

    _assert_rejected(serving_shard, None, _lookup(serving_shard, [_ids("item", np.arange(10))]), PRECONDITION,
                     serving, "training lookups need a training shard")  # fmt: skip
    _assert_rejected(serving_shard, None, _apply(serving_shard, [_grads("item", np.arange(5), np.ones((5, 8)))]),
                     PRECONDITION, serving, "read-only")  # fmt: skip

    served = serving_shard.client.lookup({"item": np.arange(10)})["item"]
    np.testing.assert_array_equal(served, np.repeat([[0.5], [0.0]], 5, axis=0) * np.ones((10, 8)))


def test_serving_shard_refuses_imports_from_clients(serving_shard: Cluster) -> None:
    """Only its own sync writes to a serving shard: a client's row would be served until
    the training shard happened to change it."""
    _synced(serving_shard, "item", np.arange(5), np.full((5, 8), 0.5))
    upsert = [_chunk("item", np.arange(3), np.full((3, 8), 9.0))]
    delete = [_chunk("item", [], np.zeros((0, 8)), num_deleted=2, deleted_ids=_id_bytes([0, 1]))]

    for chunks in (upsert, delete):
        _assert_rejected(serving_shard, None, lambda: serving_shard.stubs[0].Import(iter(chunks), timeout=10),
                         PRECONDITION, "shard 0 has role 'serving'", "changes only by sync")  # fmt: skip

    served = serving_shard.client.lookup({"item": np.arange(5)})["item"]
    np.testing.assert_array_equal(served, np.full((5, 8), 0.5, np.float32))


def test_training_lookup_whose_answer_exceeds_the_message_limit_changes_nothing(
    make_cluster: Callable[..., Cluster],
) -> None:
    """A lookup whose answer would exceed max_message_bytes is refused before any row is made.

    A lookup answer is ~4 * dim / 12 times its request (8-byte id + 4-byte count in, dim
    float32 out), so a request well under the limit can produce an answer over it. Were
    the send to fail only after the training lookup created its rows, the client would
    see an error while the table changed (as it once did); the shard refuses up front
    when num_ids * dim * 4 exceeds the limit."""
    cluster = make_cluster(num_shards=1, max_message_bytes=MIB)
    request = _ids("item", np.arange(40_000), counts=np.ones(40_000))  # 480 KB in, 1.28 MB out
    assert request.ByteSize() < MIB

    _assert_rejected(cluster, None, _lookup(cluster, [request]), EXHAUSTED, "max")


def test_default_export_chunks_fit_the_message_limit(make_cluster: Callable[..., Cluster]) -> None:
    """Export's default chunk size respects max_message_bytes, not only export_chunk_rows.

    Regression: the default chunk (export_chunk_rows = 65,536 rows) once ignored the
    message limit, so an Export with max_rows_per_chunk=0 of a large enough table failed
    with RESOURCE_EXHAUSTED "Sent message larger than max" (with the defaults, any table
    whose exported row is >= 256 floats, e.g. adagrad of dim 128 with optimizer state)."""
    cluster = make_cluster(num_shards=1, max_message_bytes=MIB)
    for start in (0, 10_000):
        cluster.client.lookup({"item": np.arange(start, start + 10_000)}, training=True)

    chunks = list(cluster.stubs[0].Export(pb.ExportRequest(include_optimizer_state=True), timeout=10))

    assert sum(c.num_rows for c in chunks) == 20_000


def test_export_imports_into_a_shard_with_the_same_id_limit(make_cluster: Callable[..., Cluster]) -> None:
    """A shard's default export chunks pass an Import into a shard with the same id limit.

    Import checks each chunk against max_ids_per_request, so Export's default chunk must
    not exceed it. Regression: it was once export_chunk_rows (65,536) whatever the limit,
    and with --max-ids-per-request below that a serving replica could not import its
    training shard's export (RESOURCE_EXHAUSTED)."""
    source = make_cluster(num_shards=1, max_ids_per_request=100)
    replica = make_cluster(num_shards=1, max_ids_per_request=100)
    for start in (0, 100):
        source.client.lookup({"item": np.arange(start, start + 100)}, training=True)

    response = replica.client.import_chunks(0, source.client.export(0))

    assert response.upserted == 200


@pytest.mark.parametrize(("bad", "code", "fragments"), [c[1:] for c in BAD_SLOT_IDS], ids=[c[0] for c in BAD_SLOT_IDS])
def test_a_bad_lookup_riding_with_gradients_is_refused_before_they_are_applied(
    ps_cluster: Cluster, ids: Ids, bad: Callable[[Ids], pb.TableIds], code: grpc.StatusCode,
    fragments: tuple[str, ...],
) -> None:  # fmt: skip
    request = pb.ApplyGradientsRequest(tables=[_grads("user", ids.known["user"], np.full((4, 8), 0.5))])
    request.then_lookup.CopyFrom(pb.LookupRequest(tables=[bad(ids)], mode=TRAINING))
    _assert_rejected(ps_cluster, ids, lambda: ps_cluster.stubs[0].ApplyGradients(request, timeout=10), code, *fragments)


def test_a_lookup_riding_with_gradients_in_no_mode_is_refused(ps_cluster: Cluster, ids: Ids) -> None:
    request = pb.ApplyGradientsRequest(tables=[_grads("user", ids.known["user"], np.full((4, 8), 0.5))])
    request.then_lookup.CopyFrom(pb.LookupRequest(tables=[_ids("item", ids.new["item"])]))
    _assert_rejected(ps_cluster, ids, lambda: ps_cluster.stubs[0].ApplyGradients(request, timeout=10), INVALID,
                     "mode must be LOOKUP_MODE_TRAINING or LOOKUP_MODE_SERVING, got 0")  # fmt: skip
