"""Checkpoint checksums: CRC32C as the standard defines it, the same over any chunking."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from monolith.checkpoint import checksums
from monolith.checkpoint.checksums import CRC32C, SHA256, Checksum, checksum


def test_crc32c_matches_the_standard_check_value() -> None:
    assert checksum(CRC32C, b"123456789") == "e3069283"  # the CRC-32C check value (RFC 3720)
    assert checksum(CRC32C, b"") == "00000000"


def test_a_buffer_in_pieces_and_chunks_sums_as_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksums, "_CHUNK", 1000)  # several chunks per piece
    values = np.random.default_rng(0).normal(size=(777, 5)).astype(np.float32)
    running = Checksum()
    for piece in np.array_split(values.reshape(-1), 4):
        running.update(memoryview(piece).cast("B"))
    assert running.hexdigest() == checksum(CRC32C, values.tobytes())


def test_sha256_is_still_computed_for_format_1() -> None:
    assert checksum(SHA256, b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_an_unknown_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown checksum 'md5'; known: crc32c, sha256"):
        Checksum("md5")
