"""Checksums of checkpoint files: CRC32C, and SHA-256 for checkpoints of manifest format 1.

A checksum here guards against damage (a torn or truncated write, bit rot, the wrong
file), not against tampering, as object stores' own per-object checksums do (GCS and S3
offer CRC32C). CRC32C in native code (SSE4.2) runs at several GB/s, so it no longer bounds
a checkpoint's write: SHA-256 ran at about the speed of the write itself.
"""

from __future__ import annotations

import hashlib

import google_crc32c

CRC32C = "crc32c"
SHA256 = "sha256"
KINDS = (CRC32C, SHA256)
_CHUNK = 4 << 20  # google_crc32c takes bytes only: a large buffer is copied out a chunk at a time


class Checksum:
    """A running checksum of the bytes passed to `update`, in order.

    Args:
        kind: CRC32C (what checkpoints are written with) or SHA256 (format 1, read only).

    Raises:
        ValueError: an unknown kind.
    """

    def __init__(self, kind: str = CRC32C) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown checksum {kind!r}; known: {', '.join(KINDS)}")
        self.kind = kind
        self._crc = 0
        self._sha = hashlib.sha256() if kind == SHA256 else None

    def update(self, data: bytes | memoryview) -> None:
        if self._sha is not None:
            self._sha.update(data)
        elif isinstance(data, bytes):
            self._crc = google_crc32c.extend(self._crc, data)
        else:
            view = memoryview(data).cast("B")
            for start in range(0, len(view), _CHUNK):
                self._crc = google_crc32c.extend(self._crc, bytes(view[start : start + _CHUNK]))

    def hexdigest(self) -> str:
        """The checksum as lowercase hex: 8 digits for CRC32C, 64 for SHA-256."""
        return self._sha.hexdigest() if self._sha is not None else f"{self._crc:08x}"


def checksum(kind: str, data: bytes) -> str:
    """The checksum of `data` as `Checksum(kind).hexdigest()` gives it."""
    running = Checksum(kind)
    running.update(data)
    return running.hexdigest()
