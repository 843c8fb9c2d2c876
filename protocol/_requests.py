"""Requests in flight for the picker: who was asked for each piece, since when, and the endgame's duplicates.

Theory of operation
-------------------
A REQUESTED piece has one or more requesters (source ids) and the time of
its first request. The first requester is the normal case; more appear only
in endgame (picker rule 4): once no wanted piece is NONE, a source may
duplicate a REQUESTED piece that others were asked for, the oldest request
first, up to ``copies`` requesters per piece, once that request is ``delay``
old (a swarm on a LAN gets a piece from a peer in tens of milliseconds;
duplicating it at once only doubles the work of the last pieces on every
node). Time is a parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = ["InFlight"]


class InFlight:
    """Requesters and first-request times of the REQUESTED pieces, and the endgame choice among them."""

    def __init__(self, copies: int, delay: float) -> None:
        self.copies = copies
        self.delay = delay
        self._by: dict[int, set[str]] = {}
        self._at: dict[int, float] = {}

    def requesters(self, index: int) -> frozenset[str]:
        return frozenset(self._by.get(index, ()))

    def add(self, index: int, source_id: str, now: float) -> None:
        by = self._by.setdefault(index, set())
        if not by:
            self._at[index] = now
        by.add(source_id)

    def remove(self, index: int, source_id: str) -> bool:
        """``source_id`` no longer has ``index`` requested; True when nobody has."""
        by = self._by.get(index)
        if by is None:
            return False
        by.discard(source_id)
        if by:
            return False
        del self._by[index]
        self._at.pop(index, None)
        return True

    def clear(self, index: int) -> set[str]:
        """``index`` arrived: forget its requests; returns who had it requested."""
        self._at.pop(index, None)
        return self._by.pop(index, set())

    def items(self) -> Iterable[tuple[int, set[str]]]:
        return self._by.items()

    def endgame_pick(self, source_id: str, may_send: Callable[[int], bool], now: float) -> int | None:
        """The oldest request ``source_id`` may duplicate (``may_send``: it holds the piece and may be asked)."""
        best: tuple[float, int] | None = None
        for i, by in self._by.items():
            at = self._at.get(i, 0.0)
            if source_id in by or len(by) >= self.copies or now - at < self.delay or not may_send(i):
                continue
            if best is None or (at, i) < best:
                best = (at, i)
        return None if best is None else best[1]

    def endgame_due(self) -> list[float]:
        """When each request becomes old enough to duplicate."""
        return [t + self.delay for t in self._at.values()]

    def check(self, in_flight: Mapping[str, set[int]], state: Sequence[object], requested: object) -> None:
        """Raise AssertionError unless the requesters match each source's ``in_flight`` and exactly the pieces in state ``requested`` have some."""
        for sid, pieces in in_flight.items():
            for i in pieces:
                assert sid in self._by.get(i, ()), (sid, i)
        for i, by in self._by.items():
            assert by, i
            assert state[i] == requested, (i, state[i])
            for sid in by:
                assert i in in_flight[sid], (sid, i)
        assert {i for i, st in enumerate(state) if st == requested} == set(self._by), "REQUESTED without requesters"
