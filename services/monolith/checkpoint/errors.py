"""What goes wrong with checkpoints, as errors that know their gRPC status."""

from __future__ import annotations

from monolith.common.errors import FailedPrecondition, NotFound, Unavailable


class CheckpointError(FailedPrecondition):
    """A checkpoint cannot be used: a corrupt or missing manifest or file, a broken chain,
    or a shard count that does not fit."""


class CheckpointNotFound(NotFound):
    """No checkpoint of that id, or none at all."""


class StorageUnavailable(Unavailable):
    """The storage could not be read or written (unreachable, permissions, full)."""
