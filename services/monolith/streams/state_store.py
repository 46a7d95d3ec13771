"""Named blobs on JetStream: a role's own state, saved beside the streams it is derived from.

A JetStream object store bucket (file storage, replicated like the streams) holding one
object per name; `put` replaces an object as a whole, so a reader sees the old blob or the
new one, never a mix. The joiner keeps one snapshot of each partition's join here.
"""

from __future__ import annotations

import nats.js.errors
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from monolith.streams.jetstream import JetStream


class StateStore:
    """One object store bucket; open it with `open` (after `ensure` made it exist).

    Args:
        store: the client's handle on the bucket.
    """

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @staticmethod
    async def ensure(js: JetStream, bucket: str, description: str, replicas: int) -> None:
        """Creates the bucket if it is missing (safe to repeat).

        Raises:
            One of TRANSIENT_ERRORS: NATS is away.
        """
        try:
            await js.object_store(bucket)
        except nats.js.errors.NotFoundError:
            await js.create_object_store(
                bucket, config=ObjectStoreConfig(description=description, replicas=replicas, storage=StorageType.FILE)
            )

    @classmethod
    async def open(cls, js: JetStream, bucket: str) -> StateStore:
        """The bucket, which must exist.

        Raises:
            One of TRANSIENT_ERRORS: NATS is away or the bucket is missing.
        """
        return cls(await js.object_store(bucket))

    async def get(self, name: str) -> bytes | None:
        """The blob saved under `name`; None if there is none."""
        try:
            return (await self._store.get(name)).data or b""
        except nats.js.errors.ObjectNotFoundError:
            return None

    async def put(self, name: str, data: bytes) -> None:
        """Saves `data` under `name`, replacing what was there."""
        await self._store.put(name, data)

    async def exists(self, name: str) -> bool:
        """Whether a blob is saved under `name` (its metadata alone is read)."""
        try:
            await self._store.get_info(name)
        except nats.js.errors.ObjectNotFoundError:
            return False
        return True

    async def delete(self, name: str) -> None:
        """Deletes the blob saved under `name`, if any."""
        try:
            await self._store.delete(name)
        except nats.js.errors.ObjectNotFoundError:
            pass
