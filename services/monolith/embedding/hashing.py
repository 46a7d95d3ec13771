"""64-bit mixing functions shared by the table, the filters, initializers and shard routing.

All arithmetic is on uint64 so numba never promotes to float (uint64 mixed with int64
becomes float64 in numba); callers convert signed ids with `np.uint64(id)`.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)


@numba.njit(inline="always", nogil=True, cache=True)
def mix64(x: np.uint64) -> np.uint64:
    """splitmix64's finalizer: a bijection on uint64 with full avalanche."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@numba.njit(inline="always", nogil=True, cache=True)
def hash_id(key: np.int64, seed: np.uint64) -> np.uint64:
    """Hash of a signed id under a seed."""
    return mix64(np.uint64(key) ^ seed)


@numba.njit(inline="always", nogil=True, cache=True)
def stream_value(base: np.uint64, j: np.int64) -> np.uint64:
    """The j-th value of a counter-based random stream keyed by base."""
    return mix64(base + _GOLDEN * np.uint64(j + 1))


@numba.njit(inline="always", nogil=True, cache=True)
def to_unit_float(x: np.uint64) -> float:
    """Maps uint64 to a float64 uniform in [0, 1) using its top 53 bits."""
    return float(x >> _S11) * (1.0 / 9007199254740992.0)


def stable_hash64(text: str) -> int:
    """A process-independent 64-bit hash of a string (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
