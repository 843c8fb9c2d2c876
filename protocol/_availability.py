"""Piece availability for the picker: how many peers hold each piece, and the open pieces bucketed by that count.

Theory of operation
-------------------
Rarest-first (picker rule 2) asks for the wanted, not yet requested pieces
(*open*: wanted and NONE) that the fewest peers hold. Instead of sorting
every piece on each pick, the open pieces sit in buckets keyed by their
peer count; a pick walks the buckets from the rarest and stops as soon as
it has enough. A HAVE moves one piece between two buckets; a bulk change
(a peer joins, leaves or sends a whole bitfield) rebuilds them, which is
cheaper than many moves and leaves no oversized sets behind.

The picker owns the piece states; it shares its ``state`` and ``wanted``
lists with this object and calls :meth:`Availability.state_changed` on
every state change, so a piece is in a bucket exactly while it is open.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["Availability"]


class Availability:
    """Peer counts per piece and the open pieces in count buckets (see the module docstring)."""

    def __init__(self, state: Sequence[enum.IntEnum], wanted: Sequence[bool], none: enum.IntEnum) -> None:
        self._state, self._wanted, self._none = state, wanted, none
        n = len(state)
        self.count = [0] * n  # peers holding each piece
        self._buckets: dict[int, set[int]] = {}
        self._bulk = max(n // 16, 64)  # more changes than this at once: rebuild the buckets
        self.rebuild()

    def is_open(self, i: int) -> bool:
        """Wanted and NONE: in a bucket."""
        return self._wanted[i] and self._state[i] is self._none

    def rebuild(self) -> None:
        # Fresh sets, since a set that once held many pieces keeps its large
        # table, and intersecting it would cost its old size on every pick.
        buckets: dict[int, set[int]] = {}
        none, state, wanted = self._none, self._state, self._wanted
        for i, c in enumerate(self.count):
            if state[i] is none and wanted[i]:
                b = buckets.get(c)
                if b is None:
                    b = buckets[c] = set()
                b.add(i)
        self._buckets = buckets

    def add(self, pieces: Iterable[int], delta: int) -> None:
        """A peer gained (+1) or lost (-1) these pieces: one move each, or a rebuild when there are many."""
        pieces = pieces if isinstance(pieces, set | frozenset) else set(pieces)
        if len(pieces) > self._bulk:
            for i in pieces:
                self.count[i] += delta
            self.rebuild()
        else:
            for i in pieces:
                self.add_one(i, delta)

    def replace(self, old: set[int], new: set[int]) -> None:
        """A peer's pieces went from ``old`` to ``new`` (a bitfield)."""
        gone, came = old - new, new - old
        if len(gone) + len(came) > self._bulk:
            for i in gone:
                self.count[i] -= 1
            for i in came:
                self.count[i] += 1
            self.rebuild()
        else:
            self.add(gone, -1)
            self.add(came, +1)

    def add_one(self, i: int, delta: int) -> None:
        c = self.count[i]
        self.count[i] = c + delta
        if self.is_open(i):
            self._remove(i, c)
            self._buckets.setdefault(c + delta, set()).add(i)

    def state_changed(self, i: int, was_open: bool) -> None:
        """The picker changed piece ``i``'s state; ``was_open``: whether it was open before."""
        now_open = self.is_open(i)
        if was_open and not now_open:
            self._remove(i, self.count[i])
        elif now_open and not was_open:
            self._buckets.setdefault(self.count[i], set()).add(i)

    def _remove(self, i: int, c: int) -> None:
        b = self._buckets[c]
        b.discard(i)
        if not b:
            del self._buckets[c]

    # -- queries ---------------------------------------------------------------
    def any_open(self) -> bool:
        """Some wanted piece is NONE (False: the picker is in endgame)."""
        return any(self._buckets.values())

    def any_unheld(self) -> bool:
        """Some open piece no peer holds (a mirror's work)."""
        return bool(self._buckets.get(0))

    def open_pieces(self) -> Iterator[int]:
        for b in self._buckets.values():
            yield from b

    def rarest(self, have: set[int] | None, failed: set[int], sizes: Sequence[int], max_bytes: int) -> list[int]:
        """Open pieces a source holding ``have`` (None: all) may send, rarest first, ties by index, up to ``max_bytes``.

        At least one piece when there is any, even if larger than ``max_bytes``.
        """
        out: list[int] = []
        total = 0
        for c in sorted(self._buckets):
            bucket = self._buckets[c]
            cands = bucket if have is None else (bucket & have if len(bucket) > len(have) else have & bucket)
            if failed:
                cands = cands - failed
            if not cands:
                continue
            # One piece (a peer's usual request) needs no sort.
            order = [min(cands)] if sizes[min(cands)] >= max_bytes and not out else sorted(cands)
            for i in order:
                if out and total + sizes[i] > max_bytes:
                    return out
                out.append(i)
                total += sizes[i]
            if total >= max_bytes:
                return out
        return out

    def check(self, peers: Iterable[set[int]]) -> None:
        """Raise AssertionError unless the counts are those of ``peers`` (each a peer's pieces) and the buckets hold exactly the open pieces."""
        counts = [0] * len(self.count)
        for have in peers:
            for i in have:
                counts[i] += 1
        assert counts == self.count, "peer counts drifted"
        bucketed = {i: c for c, b in self._buckets.items() for i in b}
        assert sum(len(b) for b in self._buckets.values()) == len(bucketed), "a piece in two buckets"
        assert bucketed == {i: self.count[i] for i in range(len(self.count)) if self.is_open(i)}, "buckets drifted"
