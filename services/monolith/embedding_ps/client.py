"""The clients of the embedding-PS: one shard's (`EmbeddingPSClient`) and a whole role's.

`EmbeddingPSClient` makes one shard's calls that move rows in bulk (Export, Import,
Restore) and its Stats, with chunks decoded both ways (`chunks.Chunk`); the train→serve
sync, the checkpoint controller and the replay use it.

`ShardedEmbeddingClient`, for trainers and model-serving, routes each id to its shard by a
stable hash of (table, id), dedupes ids within a call (sending each id once, with its
occurrence count, so admission still sees every occurrence), fans out to the shards
concurrently, and returns results in input order. It holds one `EmbeddingPSClient` per
shard, and makes its bulk calls through them.

Both raise `MonolithError`s that keep the shard's status and name the shard; a deadline
or a lost connection is UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
from concurrent import futures
from typing import Collection, Iterable, Iterator, Mapping, Sequence

import grpc
import numpy as np

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.api.embedding_ps.v1 import embedding_ps_pb2_grpc as pb_grpc
from monolith.common.channel import DEFAULT, ChannelConfig, open_channel
from monolith.common.errors import MonolithError, from_rpc_error
from monolith.common.wire import encode_array
from monolith.embedding.hashing import stable_hash64
from monolith.embedding.table import RowBatch
from monolith.embedding.table_kernels import sum_duplicates, sum_duplicates_and_squares
from monolith.embedding_ps.chunks import Chunk, decode_chunk, encode_chunk
from monolith.embedding_ps.routing import dedupe_and_route, dedupe_and_route_tables, unpack_rows

# Distinct table lists whose salts and dims are kept; callers use one or two.
_MAX_CACHED_PLANS = 64
RPC_TIMEOUT = 30.0  # seconds for a call with a small answer (Stats, Lookup, ApplyGradients)
STREAM_TIMEOUT = 300.0  # seconds a stream of rows (Export, Import, Restore) may take in all


class EmbeddingPSClient:
    """Talks to one embedding-PS shard: its stats, and its rows in bulk.

    Args:
        address: "host:port" of the shard.
        timeout: seconds for Stats.
        stream_timeout: seconds one Export, Import or Restore stream may take in all.
        channel: how to dial the shard (message limits, reconnect backoff, TLS).
        name: names the shard in errors; by default "embedding-PS at <address>".

    Attributes:
        address: where the shard is.
        name: the shard as errors name it.
        stub: the generated stub on this client's channel, for the calls this class does
            not make (the sharded client's Lookup and ApplyGradients fan-out).

    Raises:
        ConfigError: a TLS file of `channel` cannot be read.
    """

    def __init__(self, address: str, timeout: float = RPC_TIMEOUT, stream_timeout: float = STREAM_TIMEOUT,
                 channel: ChannelConfig = DEFAULT, name: str = "") -> None:  # fmt: skip
        self.address = address
        self.name = name or f"embedding-PS at {address}"
        self._channel = open_channel(address, channel)
        self.stub = pb_grpc.EmbeddingPSStub(self._channel)
        self._timeout = timeout
        self._stream_timeout = stream_timeout

    def stats(self) -> pb.StatsResponse:
        """The shard's identity (index, role, incarnation, version) and its tables' sizes and clocks."""
        try:
            return self.stub.Stats(pb.StatsRequest(), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"{self.name} Stats") from None

    def export(self, since_version: int = 0, include_optimizer_state: bool = False, max_rows_per_chunk: int = 0,
               tables: Sequence[str] = ()) -> Iterator[Chunk]:  # fmt: skip
        """The rows changed and ids deleted after a version, chunk by chunk, decoded.

        The call starts at the first `next()`; closing the iterator early cancels it. Every
        chunk carries the version the export is complete up to and the shard's incarnation.

        Args:
            since_version: 0 for every row; else a version an earlier export was complete up to.
            include_optimizer_state: rows' values carry optimizer state after the embedding.
            max_rows_per_chunk: rows per chunk at most; 0 lets the shard choose.
            tables: the tables to export; empty means all.

        Raises:
            MonolithError: the shard's status (FAILED_PRECONDITION: it forgot deletions that
                old, or awaits a restore) or a chunk whose bytes do not fit its sizes
                (INVALID_ARGUMENT).
        """
        request = pb.ExportRequest(since_version=since_version, include_optimizer_state=include_optimizer_state,
                                   max_rows_per_chunk=max_rows_per_chunk, tables=tables)  # fmt: skip
        call = self.stub.Export(request, timeout=self._stream_timeout)
        try:
            for index, message in enumerate(call):
                yield decode_chunk(message, f"export chunk {index} of table {message.table!r} from {self.name}")
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"{self.name} Export") from None
        finally:
            call.cancel()  # a no-op once the stream is complete

    def import_chunks(self, chunks: Iterable[Chunk]) -> pb.ImportResponse:
        """Streams chunks into a training shard, each applied all or nothing (deletions first).

        Raises:
            MonolithError: the shard's status; the chunks before the failed one are applied.
        """
        try:
            return self.stub.Import((encode_chunk(c) for c in chunks), timeout=self._stream_timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"{self.name} Import") from None

    def restore(self, rows: Iterable[tuple[str, RowBatch]]) -> pb.RestoreResponse:
        """Replaces every table of a training shard with (table, rows) chunks of a checkpoint.

        The rows carry optimizer state, as a checkpoint holds them. No chunks restores an
        empty shard. The shard then has a new incarnation (in the response).

        Raises:
            MonolithError: the shard's status; a refused restore changes nothing.
        """
        messages = (encode_chunk(Chunk(table, batch, includes_optimizer_state=True)) for table, batch in rows)
        try:
            return self.stub.Restore(messages, timeout=self._stream_timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"{self.name} Restore") from None

    def close(self) -> None:
        """Closes the channel, cancelling calls in flight."""
        self._channel.close()

    def __enter__(self) -> EmbeddingPSClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class _Routed:
    """One table's ids of one call, deduped and grouped by shard."""

    unique: np.ndarray  # distinct ids, shard by shard
    inverse: np.ndarray  # position of each input id in `unique`
    counts: np.ndarray  # occurrences of each unique id
    bounds: np.ndarray  # shard s owns unique[bounds[s]:bounds[s + 1]]

    def part(self, shard: int) -> slice:
        return slice(int(self.bounds[shard]), int(self.bounds[shard + 1]))


@dataclasses.dataclass(frozen=True)
class _Tables:
    """The tables of a lookup, in the caller's order, as the routing kernel takes them."""

    names: tuple[str, ...]
    dim_list: tuple[int, ...]
    dims: np.ndarray  # int64 [T]
    salts: np.ndarray  # uint64 [T], stable_hash64 of each name


@dataclasses.dataclass(frozen=True)
class _LookupPlan:
    """One lookup, routed: the request per shard and how to put the answers back in order."""

    tables: _Tables
    requests: dict[int, pb.LookupRequest]  # shard -> its request (shards with ids only)
    asked: dict[int, list[tuple[str, int, int]]]  # shard -> (table, ids, dim) per block asked
    lengths: list[int]  # ids per table, as given
    offsets: np.ndarray  # int64 [T + 1]
    source: np.ndarray  # where each given id's row is among the answers


class ShardedEmbeddingClient:
    """Talks to every shard of one embedding-PS role.

    Args:
        addresses: "host:port" of each shard, in shard order.
        table_dims: embedding dimension of each table.
        timeout: seconds per RPC.
        channel: how to dial the shards (message limits, reconnect backoff, TLS).
        stream_timeout: seconds one Export or Import stream may take in all.

    Raises:
        ConfigError: a TLS file of `channel` cannot be read.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        table_dims: Mapping[str, int],
        timeout: float = RPC_TIMEOUT,
        channel: ChannelConfig = DEFAULT,
        stream_timeout: float = STREAM_TIMEOUT,
        occurrence_tables: Collection[str] = (),
    ) -> None:
        if not addresses:
            raise ValueError("addresses: at least one shard address is required")
        self._shards = [
            EmbeddingPSClient(a, timeout, stream_timeout, channel, name=f"embedding-PS shard {i} ({a})")
            for i, a in enumerate(addresses)
        ]
        self._stubs = [s.stub for s in self._shards]
        # Blocking calls on a pool: a sync channel's `.future()` starts a thread per call,
        # which cost more than the RPC itself on loopback. Sized for several callers at once
        # (serving threads), so one caller's shard call never queues behind another's.
        self._pool = futures.ThreadPoolExecutor(max_workers=8 * len(addresses), thread_name_prefix="ps-client")
        self._dims = dict(table_dims)
        self._occurrence_tables = frozenset(occurrence_tables)
        self._salts = {name: stable_hash64(name) for name in self._dims}
        self._timeout = timeout
        self._plans: dict[tuple[str, ...], _Tables] = {}

    @property
    def num_shards(self) -> int:
        return len(self._stubs)

    def lookup(
        self,
        features: Mapping[str, np.ndarray],
        training: bool = False,
        update_time: float = 0.0,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Embeddings of ids per table, float32 [n, dim] each, in input order.

        All tables are deduped and routed in one kernel call and the answers put back in
        order in another: a serving lookup touches a dozen tables of a few hundred ids,
        where per-table numpy and kernel calls cost more than the ids themselves.

        Args:
            features: int64 ids per table (any 1-D shape; duplicates allowed).
            training: training lookup (counts occurrences, creates admitted rows).
            update_time: data (event) time in seconds for rows created; 0 means none given
                (rows get their table's newest update time; no table's clock moves).
            timeout: seconds for this lookup's calls, at most the client's timeout; None
                means the client's timeout.

        Raises:
            MonolithError: a shard failed (its status, naming it) or answered rows that do
                not match the request (INTERNAL).
        """
        plan = self._plan_lookup(features, training, update_time)
        limit = self._timeout if timeout is None else min(timeout, self._timeout)
        return self._lookup_result(plan, self._fan_out("Lookup", plan.requests, limit))

    def _plan_lookup(self, features: Mapping[str, np.ndarray], training: bool, update_time: float) -> _LookupPlan:
        tables = self._tables(tuple(features))
        arrays = [np.ascontiguousarray(ids, dtype=np.int64).reshape(-1) for ids in features.values()]
        lengths = [a.shape[0] for a in arrays]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        unique, counts, bounds, source = dedupe_and_route_tables(
            flat, offsets, tables.salts, tables.dims, np.uint64(self.num_shards)
        )
        # One shard's ids are contiguous, table by table: slice its bytes, not arrays.
        unique_bytes = unique.astype("<i8", copy=False).tobytes()
        counts_bytes = counts.astype("<i4", copy=False).tobytes() if training else b""
        mode = pb.LOOKUP_MODE_TRAINING if training else pb.LOOKUP_MODE_SERVING
        edges = bounds.tolist()
        requests: dict[int, pb.LookupRequest] = {}
        asked: dict[int, list[tuple[str, int, int]]] = {}
        for shard in range(self.num_shards):
            request = pb.LookupRequest(mode=mode, update_time=update_time)
            add = request.tables.add  # built in place: a list passed to the constructor is copied
            blocks = []
            first = shard * len(tables.names)
            for t, (name, dim) in enumerate(zip(tables.names, tables.dim_list)):
                lo, hi = edges[first + t], edges[first + t + 1]
                if hi > lo:
                    if training:
                        add(table=name, num_ids=hi - lo, ids=unique_bytes[8 * lo : 8 * hi],
                            counts=counts_bytes[4 * lo : 4 * hi])  # fmt: skip
                    else:
                        add(table=name, num_ids=hi - lo, ids=unique_bytes[8 * lo : 8 * hi])
                    blocks.append((name, hi - lo, dim))
            if blocks:
                requests[shard] = request
                asked[shard] = blocks
        return _LookupPlan(tables, requests, asked, lengths, offsets, source)

    def _lookup_result(self, plan: _LookupPlan, answers: Iterable[tuple[int, pb.LookupResponse]]) -> dict[str, np.ndarray]:
        """The rows per table in the caller's order, from every asked shard's answer."""
        parts: list[bytes] = []
        for shard, response in answers:
            parts.extend(self._answered_rows(shard, response, plan.asked[shard]))
        tables = plan.tables
        values = np.frombuffer(b"".join(parts), dtype="<f4")
        out = np.empty(sum(n * d for n, d in zip(plan.lengths, tables.dim_list)), dtype=np.float32)
        unpack_rows(values, plan.source, plan.offsets, tables.dims, out)
        result, start = {}, 0
        for name, n, dim in zip(tables.names, plan.lengths, tables.dim_list):
            result[name] = out[start : start + n * dim].reshape(n, dim)
            start += n * dim
        return result

    def apply_gradients(
        self, gradients: Mapping[str, tuple[np.ndarray, np.ndarray]], update_time: float = 0.0
    ) -> tuple[int, int]:
        """Pushes per-id gradients; duplicates of an id are summed before sending.

        Each row of a table's gradients is one occurrence of its id. For the tables in
        `occurrence_tables` (an optimizer accumulating "occurrences"), where an id occurs
        more than once, the sum of the squares of its rows travels with their sum, so
        Adagrad and FTRL accumulate as a step per occurrence would.

        Args:
            gradients: per table, (int64 ids [n], float32 gradients [n, dim]).
            update_time: data (event) time in seconds stamped on updated rows; 0 as in `lookup`.

        Returns:
            (rows updated, gradients dropped because their id had no row), over all shards.
        """
        applied = filtered = 0
        for _, response in self._fan_out("ApplyGradients", self._gradient_requests(gradients, update_time)):
            applied += response.applied
            filtered += response.filtered
        return applied, filtered

    def apply_and_lookup(
        self,
        gradients: Mapping[str, tuple[np.ndarray, np.ndarray]],
        update_time: float,
        features: Mapping[str, np.ndarray],
        training: bool = True,
        lookup_update_time: float = 0.0,
    ) -> tuple[int, int, dict[str, np.ndarray]]:
        """`apply_gradients`, then `lookup`, in one round trip per shard.

        Each shard applies its gradients, then answers its part of the lookup: the rows are
        those two calls in order would give (a trainer's next step riding with this one's
        update). A shard with only gradients or only ids gets only those.

        Returns:
            (rows updated, gradients dropped, the lookup's rows per table in input order).
        """
        requests = self._gradient_requests(gradients, update_time)
        plan = self._plan_lookup(features, training, lookup_update_time)
        for shard, lookup in plan.requests.items():
            request = requests.get(shard)
            if request is None:
                request = requests[shard] = pb.ApplyGradientsRequest(update_time=update_time)
            request.then_lookup.CopyFrom(lookup)
        applied = filtered = 0
        looked_up: list[tuple[int, pb.LookupResponse]] = []
        for shard, response in self._fan_out("ApplyGradients", requests):
            applied += response.applied
            filtered += response.filtered
            if shard in plan.requests:
                if not response.HasField("lookup"):
                    raise MonolithError(f"{self._shards[shard].name} applied the gradients but did not answer the "
                                        "lookup that rode with them (a server older than the client?)")  # fmt: skip
                looked_up.append((shard, response.lookup))
        return applied, filtered, self._lookup_result(plan, looked_up)

    def _gradient_requests(
        self, gradients: Mapping[str, tuple[np.ndarray, np.ndarray]], update_time: float
    ) -> dict[int, pb.ApplyGradientsRequest]:
        """Per shard, its part of the gradients summed per id (and squared, where asked)."""
        summed: dict[str, tuple[_Routed, np.ndarray, np.ndarray | None]] = {}
        for name, (ids, grads) in gradients.items():
            r = self._route(name, ids)
            g = np.ascontiguousarray(grads, dtype=np.float32).reshape(len(r.inverse), -1)
            if name not in self._occurrence_tables or len(r.unique) == len(r.inverse):
                # Not needed, or no id twice: the shard squares each summed gradient itself.
                summed[name] = (r, sum_duplicates(r.inverse, g, len(r.unique)), None)
            else:
                summed[name] = (r, *sum_duplicates_and_squares(r.inverse, g, len(r.unique)))
        requests = {}
        for shard in range(self.num_shards):
            entries = [
                pb.TableGradients(
                    table=name,
                    num_ids=int(r.bounds[shard + 1] - r.bounds[shard]),
                    ids=encode_array(r.unique[r.part(shard)], "<i8"),
                    dim=g.shape[1],
                    gradients=encode_array(g[r.part(shard)], "<f4"),
                    squared_gradients=b"" if sq is None else encode_array(sq[r.part(shard)], "<f4"),
                )
                for name, (r, g, sq) in summed.items()
                if r.bounds[shard + 1] > r.bounds[shard]
            ]
            if entries:
                requests[shard] = pb.ApplyGradientsRequest(tables=entries, update_time=update_time)
        return requests

    def shard(self, index: int) -> EmbeddingPSClient:
        """The client of one shard, for its bulk calls (export, import, restore)."""
        return self._shards[index]

    def export(self, shard: int, since_version: int = 0, include_optimizer_state: bool = False,
               max_rows_per_chunk: int = 0) -> Iterator[Chunk]:  # fmt: skip
        """One shard's rows changed since a version, decoded (see `EmbeddingPSClient.export`)."""
        return self._shards[shard].export(since_version, include_optimizer_state, max_rows_per_chunk)

    def import_chunks(self, shard: int, chunks: Iterable[Chunk]) -> pb.ImportResponse:
        """Streams chunks into one shard (see `EmbeddingPSClient.import_chunks`)."""
        return self._shards[shard].import_chunks(chunks)

    def stats(self) -> list[pb.StatsResponse]:
        """Every shard's stats, in shard order (asked concurrently)."""
        return list(self._pool.map(EmbeddingPSClient.stats, self._shards))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> ShardedEmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fan_out(self, method: str, requests: dict[int, object], timeout: float | None = None) -> list[tuple[int, object]]:
        """Calls `method` on each shard with a request, concurrently; answers in shard order.

        The last shard's call runs on the calling thread, the others on the pool: handing a
        call to another thread and back costs about as much CPU as a loopback RPC's client
        side, and the caller would only wait meanwhile.

        Raises:
            MonolithError: the first failed call's status (UNAVAILABLE for a shard that is
                down or too slow), naming the shard.
        """
        timeout = self._timeout if timeout is None else timeout
        order = sorted(requests)
        calls = {
            shard: self._pool.submit(getattr(self._stubs[shard], method), requests[shard], timeout=timeout)
            for shard in order[:-1]
        }
        answers = []
        try:
            own = None
            if order:
                own = self._call(order[-1], method, requests[order[-1]], timeout)
            for shard in order[:-1]:
                answers.append((shard, self._result(shard, method, calls[shard])))
            if order:
                answers.append((order[-1], own))
        except MonolithError:
            for other in calls.values():
                other.cancel()
            raise
        return answers

    def _call(self, shard: int, method: str, request: object, timeout: float) -> object:
        try:
            return getattr(self._stubs[shard], method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"{self._shards[shard].name} {method}") from None

    def _result(self, shard: int, method: str, call: futures.Future) -> object:
        try:
            return call.result()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"{self._shards[shard].name} {method}") from None

    def _answered_rows(self, shard: int, response: pb.LookupResponse, asked: list[tuple[str, int, int]]) -> list[bytes]:
        """The values of a shard's answer, block by block, once they match what was asked."""
        if len(response.tables) != len(asked):
            raise MonolithError(
                f"{self._shards[shard].name} answered {len(response.tables)} tables; "
                f"{len(asked)} were asked"
            )
        parts = []
        for entry, (name, n, dim) in zip(response.tables, asked):
            values = entry.values
            if entry.table != name or entry.num_ids != n or entry.dim != dim or len(values) != 4 * n * dim:
                raise MonolithError(
                    f"{self._shards[shard].name} answered table {entry.table!r} with "
                    f"{entry.num_ids} x {entry.dim} rows in {len(values)} bytes; asked for {name!r}, {n} x {dim}"
                )
            parts.append(values)
        return parts

    def _tables(self, names: tuple[str, ...]) -> _Tables:
        """The salts and dims of a lookup's tables, cached: callers ask for the same tables each time."""
        tables = self._plans.get(names)
        if tables is None:
            unknown = [n for n in names if n not in self._dims]
            if unknown:
                raise ValueError(f"unknown table {unknown[0]!r}; known: {', '.join(sorted(self._dims))}")
            dim_list = tuple(self._dims[n] for n in names)
            tables = _Tables(
                names=names,
                dim_list=dim_list,
                dims=np.array(dim_list, dtype=np.int64),
                salts=np.array([self._salts[n] for n in names], dtype=np.uint64),
            )
            if len(self._plans) < _MAX_CACHED_PLANS:
                self._plans[names] = tables
        return tables

    def _route(self, name: str, ids: np.ndarray) -> _Routed:
        if name not in self._dims:
            raise ValueError(f"unknown table {name!r}; known: {', '.join(sorted(self._dims))}")
        flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        return _Routed(*dedupe_and_route(flat, np.uint64(self._salts[name]), np.uint64(self.num_shards)))
