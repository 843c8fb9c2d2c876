"""Content-defined chunking (CDC): piece boundaries that follow the bytes, not offsets.

The boundary function is stated byte-exactly in docs/manifest.md ("Content-
defined pieces") with golden vectors in tests/vectors/cdc-v1.json, so any
implementation can reproduce a plan. In short:

* ``GEAR``: 256 unsigned 32-bit words, the first 1024 bytes of the BLAKE3
  extendable output of ``b"autoglm-node cdc gear v1"``, read little-endian.
* The gear hash at byte ``i`` is ``h_i = sum(GEAR[data[i-k]] << k for k in
  0..31) mod 2**32``: a 32-byte window, the same value the rolling form
  ``h = ((h << 1) + GEAR[b]) mod 2**32`` reaches after 32 bytes.
* A piece starting at ``s`` ends after the smallest length ``L`` with
  ``min <= L`` such that ``L == max``, or ``s + L`` is the end of the data, or
  ``h_{s+L-1} & mask(L) == 0``; ``mask(L)`` is the top ``bits + 2`` bits of
  the word while ``L < avg`` and the top ``bits - 2`` bits from then on
  (FastCDC's normalised chunking, level 2), where ``avg == 2**bits``.

Since ``min >= 64`` the window never reaches back before the piece start, so
the hash needs no reset rule. An insertion or deletion moves only the
boundaries near it: once the window has passed the edit and a boundary has
been found, every later boundary is the old one shifted.

The hashing is vectorised with numpy: the windowed sum is built by doubling
(``H_2w[i] = H_w[i] + (H_w[i-w] << w)``, five steps from ``H_1 = GEAR[b]``)
over blocks small enough to stay in cache, so only the rare positions that
pass the easier mask reach Python.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3

if TYPE_CHECKING:  # numpy loads on the first hash, not with the module (CLI start-up)
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "CDC_GEAR_SEED",
    "CdcParams",
    "cdc_candidates",
    "cdc_cut",
    "cdc_params_for",
    "gear_table",
    "plan_cdc",
    "plan_cdc_reader",
]

CDC_GEAR_SEED = b"autoglm-node cdc gear v1"
WINDOW = 32
NORMALISATION = 2
_BLOCK = 1 << 18  # bytes hashed per numpy pass (about 1 MiB of uint32 words: stays in L2)

Span = tuple[int, int]


def gear_table() -> tuple[int, ...]:
    """The 256 gear words (see the module docstring)."""
    raw = blake3.blake3(CDC_GEAR_SEED).digest(length=1024)
    return tuple(int.from_bytes(raw[4 * i : 4 * i + 4], "little") for i in range(256))


@functools.cache
def _gear_array() -> npt.NDArray[np.uint32]:
    import numpy as np

    return np.array(gear_table(), dtype=np.uint32)


@dataclass(frozen=True, slots=True)
class CdcParams:
    """Piece sizes for CDC: ``avg == 2**bits``, ``64 <= min <= avg <= max``."""

    min_size: int
    bits: int
    max_size: int

    def __post_init__(self) -> None:
        if not 4 <= self.bits <= 29:
            raise ValueError("cdc bits must be in 4..29")
        if not 64 <= self.min_size <= self.avg_size <= self.max_size:
            raise ValueError("cdc sizes must satisfy 64 <= min <= avg <= max")

    @property
    def avg_size(self) -> int:
        return 1 << self.bits

    @property
    def mask_strict(self) -> int:
        """Top ``bits + 2`` bits: used while the piece is shorter than avg."""
        n = min(32, self.bits + NORMALISATION)
        return ((1 << n) - 1) << (32 - n)

    @property
    def mask_loose(self) -> int:
        """Top ``bits - 2`` bits: used from avg to max."""
        n = self.bits - NORMALISATION
        return ((1 << n) - 1) << (32 - n)


# The defaults for this project's pieces (docs/manifest.md, "Content-defined pieces").
DEFAULT_CDC = CdcParams(min_size=64 * 1024, bits=18, max_size=1024 * 1024)


def cdc_params_for(max_piece: int) -> CdcParams | None:
    """The default parameters, scaled down when the manifest's max piece is small.

    ``avg`` is 256 KiB, or the largest power of two no more than ``max_piece / 4``;
    ``min = avg / 4`` and ``max = min(4 * avg, max_piece)``. ``None`` when
    ``max_piece`` is too small for CDC (under 256 bytes): plan fixed pieces then.
    """
    if max_piece >= 4 * DEFAULT_CDC.avg_size:
        return DEFAULT_CDC
    if max_piece < 256:
        return None
    bits = (max_piece // 4).bit_length() - 1
    avg = 1 << bits
    return CdcParams(min_size=max(64, avg // 4), bits=bits, max_size=min(4 * avg, max_piece))


def _hashes(buf: npt.NDArray[np.uint8], h: npt.NDArray[np.uint32], tmp: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """Windowed gear hash at every position of ``buf`` into ``h`` (the first 31 are partial)."""
    import numpy as np

    n = len(buf)
    h = h[:n]
    np.take(_gear_array(), buf, out=h)
    w = 1
    while w < min(WINDOW, n):
        np.left_shift(h[: n - w], np.uint32(w), out=tmp[: n - w])
        np.add(h[w:], tmp[: n - w], out=h[w:])
        w *= 2
    return h


def cdc_candidates(data: bytes | bytearray | memoryview, base: int, params: CdcParams) -> tuple[list[int], list[bool]]:
    """Absolute positions ``base + i`` whose hash passes the loose mask, and whether each passes the strict one.

    Positions below ``base + 31`` have a partial window and are left out;
    callers feed overlapping blocks (31 bytes of the previous block first).
    """
    import numpy as np

    arr = np.frombuffer(data, dtype=np.uint8)
    pos: list[int] = []
    strict: list[bool] = []
    # a mask of the top n bits is zero exactly when the word is below 2**(32 - n)
    loose = np.uint32((~params.mask_loose & 0xFFFFFFFF) + 1)
    tight = np.uint32((~params.mask_strict & 0xFFFFFFFF) + 1) if params.mask_strict != 0xFFFFFFFF else np.uint32(1)
    step = _BLOCK
    hbuf = np.empty(step + WINDOW, dtype=np.uint32)
    tmp = np.empty(step + WINDOW, dtype=np.uint32)
    for start in range(0, len(arr), step):
        lo = max(0, start - (WINDOW - 1))
        h = _hashes(arr[lo : start + step], hbuf, tmp)
        first = start - lo if start else WINDOW - 1
        idx = np.flatnonzero(h[first:] < loose) + first
        if idx.size:
            pos.extend((idx + (lo + base)).tolist())
            strict.extend((h[idx] < tight).tolist())
    return pos, strict


def cdc_cut(size: int, candidates: list[int], strict: list[bool], params: CdcParams) -> list[Span]:
    """Pieces from the sorted candidate positions (the boundary rule in the module docstring)."""
    out: list[Span] = []
    s = 0
    avg, lo, hi = params.avg_size, params.min_size, params.max_size
    while s < size:
        if size - s <= lo:
            out.append((s, size - s))
            break
        end = min(s + hi, size)  # exclusive end if no boundary is found
        # candidate byte index i gives length i - s + 1; the first allowed is L == min
        j = bisect.bisect_left(candidates, s + lo - 1)
        cut = end
        while j < len(candidates):
            i = candidates[j]
            length = i - s + 1
            if s + length >= end:
                break
            if length >= avg or strict[j]:
                cut = s + length
                break
            j += 1
        out.append((s, cut - s))
        s = cut
    return out


def plan_cdc(data: bytes | bytearray | memoryview, params: CdcParams, base: int = 0, size: int | None = None) -> list[Span]:
    """CDC plan of ``data`` held in memory; spans are offset by ``base``."""
    n = len(data) if size is None else size
    cands, strict = cdc_candidates(data, 0, params)
    return [(base + o, length) for o, length in cdc_cut(n, cands, strict, params)]


def plan_cdc_reader(read: Callable[[int, int], bytes], offset: int, length: int, params: CdcParams, block: int = 16 << 20) -> list[Span]:
    """CDC plan of ``length`` bytes at ``offset`` of a file, read in blocks of ``block`` bytes.

    ``read(off, n)`` returns exactly ``n`` bytes at ``off``. Memory stays
    O(block) whatever the length.
    """
    cands: list[int] = []
    strict: list[bool] = []
    pos = 0
    tail = b""
    while pos < length:
        n = min(block, length - pos)
        chunk = read(offset + pos, n)
        if len(chunk) != n:
            raise OSError(f"short read at {offset + pos}: file changed while it was planned")
        buf = tail + chunk
        c, st = cdc_candidates(buf, pos - len(tail), params)
        # the first len(tail) positions were covered by the previous block
        keep = bisect.bisect_left(c, pos)
        cands.extend(c[keep:])
        strict.extend(st[keep:])
        tail = buf[-(WINDOW - 1) :]
        pos += n
    return [(offset + o, n) for o, n in cdc_cut(length, cands, strict, params)]

