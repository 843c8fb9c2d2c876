"""An independent, byte-at-a-time implementation of the CDC boundary rule (docs/manifest.md).

Written from the documentation's rolling form, not from protocol/_cdc.py (which
vectorises the windowed form), so the two check each other. Slow: tests feed
it at most a few hundred KiB.
"""

from __future__ import annotations

import blake3

SEED = b"autoglm-node cdc gear v1"


def gear() -> list[int]:
    raw = blake3.blake3(SEED).digest(length=1024)
    return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, 1024, 4)]


def reference_plan(data: bytes, min_size: int, bits: int, max_size: int) -> list[tuple[int, int]]:
    g = gear()
    avg = 1 << bits
    strict = ((1 << min(32, bits + 2)) - 1) << (32 - min(32, bits + 2))
    loose = ((1 << (bits - 2)) - 1) << (32 - (bits - 2))
    out: list[tuple[int, int]] = []
    s, n = 0, len(data)
    while s < n:
        h, length = 0, 0
        while True:
            h = ((h << 1) + g[data[s + length]]) & 0xFFFFFFFF
            length += 1
            if s + length == n or length == max_size:
                break
            if length >= min_size and h & (strict if length < avg else loose) == 0:
                break
        out.append((s, length))
        s += length
    return out


def vector_bytes(seed: str, length: int) -> bytes:
    """The input bytes of a vector: BLAKE3 extendable output of the seed."""
    return blake3.blake3(seed.encode()).digest(length=length)
