"""A shuffle that is computed, not stored: a keyed bijection of ``0 .. n - 1``.

The loader visits an epoch's windows in the order ``permute(0..n-1)``. A stored permutation costs 8 bytes per
window on every rank (1.95 GB for a terabyte at 2,048 tokens a window) and seconds to build each epoch; this one
costs nothing and gives the position of any window in O(1), which is also what exact resume needs.

It is a balanced Feistel network over ``2k`` bits (the smallest even width holding ``n``), with a splitmix64 round
function keyed by the seed, and cycle walking: a value that lands at or above ``n`` is mapped again until it is
below, which keeps the map a bijection of ``0 .. n - 1`` (the domain is under ``4n``, so a few steps at most on
average).
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def round_keys(key: tuple[int, ...] | list[int]) -> np.ndarray:
    """``ROUNDS`` 64-bit round keys from a tuple of non-negative ints (seed, epoch, stream, ...)."""
    state = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for part in key:
            state = _mix(np.asarray([state ^ np.uint64(int(part) & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))[0]
        keys = []
        for r in range(ROUNDS):
            state = _mix(np.asarray([state + np.uint64(0x9E3779B97F4A7C15) * np.uint64(r + 1)], dtype=np.uint64))[0]
            keys.append(state)
    return np.asarray(keys, dtype=np.uint64)


def permute(index: np.ndarray | int, n: int, key: tuple[int, ...] | list[int]) -> np.ndarray:
    """Where positions ``index`` (each in ``0 .. n - 1``) go under the bijection of ``0 .. n - 1`` keyed by ``key``."""
    values = np.atleast_1d(np.asarray(index, dtype=np.uint64)).copy()
    if n <= 0:
        raise ValueError(f"cannot permute an empty range (n={n})")
    if values.size and int(values.max()) >= n:
        raise ValueError(f"index {int(values.max())} is outside 0 .. {n - 1}")
    if n == 1:
        return values.astype(np.int64)
    half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
    half_mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    keys = round_keys(key)
    pending = np.ones(values.shape, dtype=bool)
    with np.errstate(over="ignore"):
        while pending.any():
            x = values[pending]
            left, right = x >> shift, x & half_mask
            for k in keys:
                left, right = right, left ^ (_mix(right ^ k) & half_mask)
            x = (left << shift) | right
            values[pending] = x
            pending[pending] = x >= np.uint64(n)
    return values.astype(np.int64)
