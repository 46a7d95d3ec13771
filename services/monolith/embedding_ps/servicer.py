"""The EmbeddingPS gRPC servicer: a thin adapter between protos and `EmbeddingShard`.

Each RPC decodes its arrays (length-checked), calls the shard, and encodes the answer.
Errors are exceptions that know their status, mapped by the server's interceptor.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import grpc
import numpy as np

from monolith.api.embedding_ps.v1 import embedding_ps_pb2 as pb
from monolith.api.embedding_ps.v1 import embedding_ps_pb2_grpc as pb_grpc
from monolith.common.errors import InvalidArgument, ResourceExhausted
from monolith.common.wire import decode_array, encode_array
from monolith.embedding.table import RowBatch
from monolith.embedding_ps.chunks import Chunk, decode_chunk, encode_chunk
from monolith.embedding_ps.shard import EmbeddingShard, Gradients

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingPS"].full_name


class EmbeddingPSServicer(pb_grpc.EmbeddingPSServicer):
    """Serves one shard."""

    def __init__(self, shard: EmbeddingShard) -> None:
        self._shard = shard

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        training, requests = self._lookup_requests(request)
        response = pb.LookupResponse()
        self._answer(response, requests, self._shard.lookup(requests, training, request.update_time))
        return response

    def ApplyGradients(
        self, request: pb.ApplyGradientsRequest, context: grpc.ServicerContext
    ) -> pb.ApplyGradientsResponse:
        requests = []
        for s in request.tables:
            ids = self._ids(s.table, s.num_ids, s.ids)
            grads = decode_array(s.gradients, "<f4", (s.num_ids, s.dim), f"table {s.table!r} gradients")
            squares = None
            if s.squared_gradients:
                squares = decode_array(s.squared_gradients, "<f4", (s.num_ids, s.dim),
                                       f"table {s.table!r} squared_gradients")  # fmt: skip
            requests.append(Gradients(s.table, ids, grads, squares))
        if not request.HasField("then_lookup"):
            applied, filtered = self._shard.apply_gradients(requests, request.update_time)
            return pb.ApplyGradientsResponse(applied=applied, filtered=filtered, version=self._shard.version)
        # The lookup that rides along is decoded and checked before anything is applied.
        training, then = self._lookup_requests(request.then_lookup)
        applied, filtered, embeddings = self._shard.apply_then_lookup(
            requests, request.update_time, then, training, request.then_lookup.update_time
        )
        response = pb.ApplyGradientsResponse(applied=applied, filtered=filtered, version=self._shard.version)
        self._answer(response.lookup, then, embeddings)
        return response

    def _lookup_requests(self, request: pb.LookupRequest) -> tuple[bool, list[tuple[str, np.ndarray, np.ndarray | None]]]:
        """A lookup's mode and (table, ids, counts) per table, checked."""
        if request.mode not in (pb.LOOKUP_MODE_TRAINING, pb.LOOKUP_MODE_SERVING):
            raise InvalidArgument(f"mode must be LOOKUP_MODE_TRAINING or LOOKUP_MODE_SERVING, got {request.mode}")
        requests = []
        for s in request.tables:  # each field read builds a new object: read each once
            name, num_ids = s.table, s.num_ids
            requests.append((name, self._ids(name, num_ids, s.ids), self._counts(name, num_ids, s.counts)))
        return request.mode == pb.LOOKUP_MODE_TRAINING, requests

    def _answer(self, response: pb.LookupResponse, requests: list, embeddings: list[np.ndarray]) -> None:
        """Writes a lookup's rows into `response` (built in place: no copy of the rows)."""
        response.version = self._shard.version
        add = response.tables.add
        for (name, _, _), e in zip(requests, embeddings):
            add(table=name, num_ids=e.shape[0], dim=e.shape[1], values=encode_array(e, "<f4"))

    def Export(self, request: pb.ExportRequest, context: grpc.ServicerContext) -> Iterator[pb.RowChunk]:
        chunks = self._shard.export(
            request.since_version, request.include_optimizer_state, request.max_rows_per_chunk, list(request.tables)
        )
        for c in chunks:
            # The incarnation is read per chunk: a restore midway swaps the tables, and the
            # chunks after it must say they come from the new ones.
            yield encode_chunk(Chunk(
                table=c.table, rows=c.rows, deleted_ids=c.deleted_ids, version=c.version,
                incarnation=self._shard.incarnation, newest_update_time=c.newest_update_time,
                includes_optimizer_state=c.includes_optimizer_state,
            ))  # fmt: skip

    def Import(self, request_iterator: Iterable[pb.RowChunk], context: grpc.ServicerContext) -> pb.ImportResponse:
        upserted = deleted = 0
        for index, message in enumerate(request_iterator):
            table = message.table
            what = f"import chunk {index} ({upserted} rows, {deleted} deletions applied before it): table {table!r}"
            c = self._decode_chunk(message, what)
            u, d = self._shard.import_chunk(c.table, c.rows, c.deleted_ids, what)
            upserted += u
            deleted += d
        return pb.ImportResponse(upserted=upserted, deleted=deleted, version=self._shard.version)

    def Restore(self, request_iterator: Iterable[pb.RowChunk], context: grpc.ServicerContext) -> pb.RestoreResponse:
        def chunks() -> Iterator[tuple[str, RowBatch, np.ndarray, str]]:
            for index, message in enumerate(request_iterator):
                what = f"restore chunk {index}: table {message.table!r}"
                c = self._decode_chunk(message, what)
                yield c.table, c.rows, c.deleted_ids, what

        rows = self._shard.restore(chunks())
        return pb.RestoreResponse(rows=rows, version=self._shard.version, incarnation=self._shard.incarnation)

    def _decode_chunk(self, message: pb.RowChunk, what: str) -> Chunk:
        self._check_id_limit(message.num_rows, what)
        return decode_chunk(message, what)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        cfg = self._shard.config
        return pb.StatsResponse(
            shard=cfg.shard,
            num_shards=cfg.num_shards,
            role=cfg.role,
            version=self._shard.version,
            incarnation=self._shard.incarnation,
            awaiting_restore=self._shard.awaiting_restore,
            tables=[
                pb.TableStats(
                    table=name,
                    rows=s.rows,
                    bytes=s.bytes,
                    admissions=s.admissions,
                    filtered_gradients=s.filtered_gradients,
                    evictions=s.evictions,
                    pending_ids=s.pending_ids,
                    newest_update_time=s.newest_update_time,
                )
                for name, s in self._shard.stats().items()
            ],
        )

    def _ids(self, name: str, num_ids: int, data: bytes) -> np.ndarray:
        what = f"table {name!r}"
        self._check_id_limit(num_ids, what)
        return decode_array(data, "<i8", (num_ids,), f"{what} ids")

    def _check_id_limit(self, num_ids: int, what: str) -> None:
        limit = self._shard.config.max_ids_per_request
        if num_ids > limit:
            raise ResourceExhausted(f"{what}: {num_ids} ids; the limit is max_ids_per_request={limit}")

    @staticmethod
    def _counts(name: str, num_ids: int, data: bytes) -> np.ndarray | None:
        if not data:
            return None
        return decode_array(data, "<i4", (num_ids,), f"table {name!r} counts")
