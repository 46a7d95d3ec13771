"""The contents of in-process embedding-PS shards, to compare two moments row for row."""

from __future__ import annotations

from collections.abc import Iterable

from monolith.embedding_ps.shard import EmbeddingShard


def exported_rows(shards: Iterable[EmbeddingShard]) -> dict[str, dict[int, bytes]]:
    """Every row of the shards, with optimizer state: table -> id -> its values' and update time's bytes."""
    out: dict[str, dict[int, bytes]] = {}
    for shard in shards:
        for chunk in shard.export(0, True):
            table = out.setdefault(chunk.table, {})
            for k, row_id in enumerate(chunk.rows.ids.tolist()):
                table[row_id] = chunk.rows.values[k].tobytes() + chunk.rows.update_times[k].tobytes()
    return out
