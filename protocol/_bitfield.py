"""Which pieces of a manifest a node holds, one bit per piece.

Bit ``i`` is bit ``7 - i % 8`` of byte ``i // 8`` (most significant first, as
in BitTorrent). Spare bits in the last byte must be zero on the wire, so
every set of pieces has exactly one encoding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Bitfield"]


class Bitfield:
    """A mutable set of piece indices in ``range(size)``."""

    __slots__ = ("_bits", "_count", "size")

    def __init__(self, size: int, indices: Iterable[int] = ()) -> None:
        if size < 0:
            raise LocalProtocolError("a bitfield size is not negative")
        self.size = size
        self._bits = bytearray((size + 7) // 8)
        self._count = 0
        for i in indices:
            self.add(i)

    @classmethod
    def full(cls, size: int) -> Bitfield:
        bf = cls(size)
        bf._bits[:] = b"\xff" * len(bf._bits)
        if size % 8:
            bf._bits[-1] = (0xFF << (8 - size % 8)) & 0xFF
        bf._count = size
        return bf

    @classmethod
    def from_bytes(cls, data: bytes, size: int) -> Bitfield:
        """Decode a peer's bitfield; RemoteProtocolError on a wrong length or spare bits set."""
        if len(data) != (size + 7) // 8:
            raise RemoteProtocolError(f"bitfield of {len(data)} bytes does not fit {size} pieces")
        if size % 8 and data[-1] & (0xFF >> (size % 8)):
            raise RemoteProtocolError("bitfield has spare bits set")
        bf = cls(size)
        bf._bits[:] = data
        bf._count = sum(b.bit_count() for b in data)
        return bf

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.size:
            raise LocalProtocolError(f"piece {i} is outside 0..{self.size - 1}")

    def __contains__(self, i: object) -> bool:
        if not isinstance(i, int) or not 0 <= i < self.size:
            return False
        return bool(self._bits[i >> 3] & (0x80 >> (i & 7)))

    def add(self, i: int) -> bool:
        """Set bit ``i``; True if it was not set before."""
        self._check(i)
        mask = 0x80 >> (i & 7)
        if self._bits[i >> 3] & mask:
            return False
        self._bits[i >> 3] |= mask
        self._count += 1
        return True

    def discard(self, i: int) -> bool:
        """Clear bit ``i``; True if it was set."""
        self._check(i)
        mask = 0x80 >> (i & 7)
        if not self._bits[i >> 3] & mask:
            return False
        self._bits[i >> 3] &= ~mask & 0xFF
        self._count -= 1
        return True

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for byte_i, b in enumerate(self._bits):
            if b:
                for bit in range(8):
                    if b & (0x80 >> bit):
                        yield byte_i * 8 + bit

    @property
    def complete(self) -> bool:
        return self._count == self.size

    def copy(self) -> Bitfield:
        bf = Bitfield(self.size)
        bf._bits[:] = self._bits
        bf._count = self._count
        return bf

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitfield) and other.size == self.size and other._bits == self._bits

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Bitfield({self.size}, {len(self)} set)"
