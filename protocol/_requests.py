"""Requests in flight for the picker: who was asked for each piece, since when, and the endgame's duplicates.

Theory of operation
-------------------
A REQUESTED piece has one or more requesters (source ids), each with the
time it was asked. The first requester is the normal case; more appear only
in endgame (picker rule 4): once no wanted piece is NONE, a source may
duplicate a REQUESTED piece that others were asked for, up to ``copies``
requesters per piece, when two things hold:

* **the request is late** against this node's own piece times: older than
  ``late`` × the time a piece of its size takes from that *kind* of source
  (peer, mirror), as this fetch measured it, and never younger than
  ``delay``. With no piece measured yet from that kind, a request is late
  after ``delay`` only if it has received nothing at all (a stall): one
  whose bytes are moving gives no evidence that another source would be
  faster. (A swarm on a LAN gets a piece from a peer in tens of
  milliseconds; on a 20 Mbit/s link shared by a node's whole pipeline every
  piece takes minutes, and a fixed delay would duplicate every piece in
  flight and drop the loser's bytes.)
* **the duplicate is expected to finish sooner**: the new source's own
  expected time for the piece is no longer than what the outstanding request
  still needs. Where the caller reports the piece's bytes received so far
  (``progress``), that is the rest at the rate the request has had, and the
  new source's time is at least the time this node's link needs for the
  rest of every other request in flight plus the whole piece, at the rate
  those requests have had (a duplicate shares the link with them: while the
  link is busy, the time a source took when it was quiet says nothing, and
  a duplicate only helps once the request would end after everything else).
  A request with no bytes at all is judged without that floor, so a stall
  is rescued as soon as it is late. So a request that is moving, only slower than
  before because this node's link is shared by more requests now, is not
  duplicated (a duplicate would take a share of the same link and drop the
  loser's bytes), and one from a source that sends slowly or has stopped is. With no bytes yet, the request
  is expected at its source's own time while that is ahead, and once
  overdue to need as long again as it has waited (a request that stalled is
  expected to take ever longer, so any source that delivers at all rescues
  it in the end). A source with no measured piece yet counts as sooner
  (nothing says otherwise).

Among the pieces a source may duplicate, the oldest request goes first.

Piece times (:class:`PieceTimes`): each written piece gives its source a
sample, the time from that source's request to the piece, per byte. Each
source and each kind keep a decaying ratio (time summed over bytes summed,
older samples weighing less), so one tiny piece does not set the rate and a
source that got slower shows it within a few pieces. A piece in the middle
of a mirror run counts its wait behind the run's earlier pieces, like a
pipelined peer piece its share of the link: the estimate is "how long a
request of this node takes to come back", which is what lateness needs.

Time is a parameter everywhere; :meth:`InFlight.endgame_due` gives the
instants when a duplicate may become allowed, so the caller knows when to
pick again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Endgame", "InFlight", "PieceTimes", "Source"]

#: Weight kept by the older samples when a new one arrives.
DECAY = 0.8


@dataclass(slots=True)
class _Rate:
    seconds: float = 0.0
    nbytes: float = 0.0

    def add(self, seconds: float, nbytes: int) -> None:
        self.seconds = DECAY * self.seconds + seconds
        self.nbytes = DECAY * self.nbytes + nbytes

    def expect(self, nbytes: int) -> float:
        return self.seconds / self.nbytes * nbytes if self.nbytes > 0 else 0.0


class PieceTimes:
    """Measured request-to-piece times, per source and per kind of source (seconds per byte, decaying)."""

    def __init__(self) -> None:
        self._src: dict[str, _Rate] = {}
        self._kind: dict[Hashable, _Rate] = {}

    def sample(self, source_id: str, kind: Hashable, seconds: float, nbytes: int) -> None:
        """A piece of ``nbytes`` came from ``source_id`` ``seconds`` after it was asked for."""
        if nbytes <= 0 or seconds < 0:
            return
        self._src.setdefault(source_id, _Rate()).add(seconds, nbytes)
        self._kind.setdefault(kind, _Rate()).add(seconds, nbytes)

    def forget(self, source_id: str) -> None:
        self._src.pop(source_id, None)

    def source(self, source_id: str, nbytes: int) -> float | None:
        """Expected seconds for ``nbytes`` from ``source_id`` (None: none measured yet)."""
        r = self._src.get(source_id)
        return None if r is None or r.nbytes <= 0 else r.expect(nbytes)

    def kind(self, kind: Hashable, nbytes: int) -> float | None:
        """Expected seconds for ``nbytes`` from a source of ``kind`` (None: none measured yet)."""
        r = self._kind.get(kind)
        return None if r is None or r.nbytes <= 0 else r.expect(nbytes)


#: With nothing measured for its kind of source, a request whose bytes are coming is late once it
#: is this old (seconds) and its rate so far is under UNMEASURED_FLOOR (bytes/s): a source that
#: trickles a piece (a resumed fetch with one piece left, a small model) is rescued, not waited on
#: for ever. A projection of the piece's time was tried and duplicated pieces on a slow shared
#: link (an edge device's 20 Mbit/s split among its requests, tests/sim/test_sim.py).
UNMEASURED_HORIZON = 5.0
UNMEASURED_FLOOR = 64 * 1024

#: What the endgame asks of the picker: a piece's size, and a requester's kind of source.
Size = Callable[[int], int]
KindOf = Callable[[str], Hashable]


@dataclass(slots=True)
class Source:
    """One of the picker's sources: its kind (the picker's ``SourceKind``), what it holds, what it got wrong, what it was asked."""

    kind: Hashable
    have: set[int] | None  # None: every piece
    failed: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)

    def has(self, index: int) -> bool:
        return self.have is None or index in self.have

    def may_ask(self, index: int) -> bool:
        """It holds ``index`` and never sent it wrong (picker rule 1)."""
        return self.has(index) and index not in self.failed


class InFlight:
    """Requesters and their request times for the REQUESTED pieces, and the endgame choice among them."""

    def __init__(self, copies: int, delay: float, late: float = 2.0) -> None:
        if late < 0 or delay < 0:
            raise ValueError("endgame delay and lateness factor must be >= 0")
        self.copies = copies
        self.delay = delay
        self.late = late
        self.times = PieceTimes()
        #: Bytes of a piece received so far by its furthest requester (None: not reported).
        self.progress: Callable[[int], int] | None = None
        self._load: tuple[float, float, float] | None = None  # (now, bytes still to come, bytes/s coming) then
        self._by: dict[int, dict[str, float]] = {}  # piece -> requester -> when asked

    def requesters(self, index: int) -> frozenset[str]:
        return frozenset(self._by.get(index, ()))

    def add(self, index: int, source_id: str, now: float) -> None:
        self._by.setdefault(index, {}).setdefault(source_id, now)

    def remove(self, index: int, source_id: str) -> bool:
        """``source_id`` no longer has ``index`` requested; True when nobody has."""
        by = self._by.get(index)
        if by is None:
            return False
        by.pop(source_id, None)
        if by:
            return False
        del self._by[index]
        return True

    def clear(self, index: int) -> dict[str, float]:
        """``index`` arrived: forget its requests; returns who had it requested, and since when."""
        return self._by.pop(index, {})

    def items(self) -> Iterable[tuple[int, Mapping[str, float]]]:
        return self._by.items()

    # -- the endgame rule ---------------------------------------------------
    def _first(self, by: Mapping[str, float]) -> tuple[float, str]:
        return min((t, s) for s, t in by.items())

    def _late_after(self, index: int, sid: str, size: Size, kind_of: KindOf) -> float:
        """Seconds after its request at which a request of ``sid`` for ``index`` counts as late."""
        typical = self.times.kind(kind_of(sid), size(index))
        if typical is not None:
            return max(self.delay, self.late * typical)
        got = 0 if self.progress is None else self.progress(index)
        if got > 0:
            # Nothing measured to judge it by, and its bytes are coming: late once it is past the
            # horizon and its rate so far is under the floor (age > got / floor). Whether a
            # duplicate then pays is _sooner's question.
            return max(self.delay, UNMEASURED_HORIZON, got / UNMEASURED_FLOOR)
        return self.delay

    def endgame_pick(
        self, source_id: str, may_send: Callable[[int], bool], now: float, size: Size, kind_of: KindOf,
    ) -> int | None:
        """The oldest late request that ``source_id`` may duplicate and is expected to finish sooner.

        ``may_send``: it holds the piece and may be asked for it; ``size``: a piece's bytes;
        ``kind_of``: a requester's kind (whose piece times judge lateness).
        """
        best: tuple[float, int] | None = None
        for i, by in self._by.items():
            if source_id in by or len(by) >= self.copies:
                continue
            at, first = self._first(by)
            if best is not None and (at, i) >= best:
                continue
            late = self._late_after(i, first, size, kind_of)
            if now < at + late or not may_send(i):  # at + late: the instant endgame_due gives
                continue
            mine = self.times.source(source_id, size(i))
            if self.progress is not None and (got := self.progress(i)) > 0:
                # A moving request: a duplicate shares this node's link with every other request.
                rest, rate = self._link(now, size)
                age = now - at
                rest, rate = rest - (size(i) - got), rate - (got / age if age > 0 else 0.0)
                if rate > 0:
                    mine = max(mine or 0.0, (rest + size(i)) / rate)
            if mine is not None and not all(self._sooner(mine, i, t, s, now, size) for s, t in by.items()):
                continue
            best = (at, i)
        return None if best is None else best[1]

    def _link(self, now: float, size: Size) -> tuple[float, float]:
        """This node's requests in flight: bytes still to come, and bytes/s coming (each request's rate so far).

        Scanned once per instant.
        """
        if self._load is None or self._load[0] != now:
            rest = rate = 0.0
            if self.progress is not None:
                for i, by in self._by.items():
                    got = self.progress(i)
                    rest += max(0, size(i) - got)
                    age = now - min(by.values())
                    if got > 0 and age > 0:
                        rate += got / age
            self._load = (now, rest, rate)
        return self._load[1], self._load[2]

    def _sooner(self, mine: float, index: int, at: float, sid: str, now: float, size: Size) -> bool:
        """Whether ``mine`` seconds from ``now`` is no later than the request of ``sid`` made at ``at`` is expected to end.

        That request is expected at its source's own time while that is ahead; once overdue (or
        never measured), it is expected to need as long again as it has waited. Compared as
        instants, the same sums :meth:`endgame_due` gives.
        """
        n = size(index)
        got = 0 if self.progress is None else self.progress(index)
        if got >= n > 0:
            return False  # all its bytes are in: it ends as soon as they are checked
        if got > 0 and now > at:
            return mine * got <= (n - got) * (now - at)  # the rest at the rate it has had
        own = self.times.source(sid, n)
        if own is not None and at + own > now:
            return now + mine <= at + own
        return at + mine <= now

    def endgame_due(self, now: float, candidates: Callable[[int], Iterable[str]], size: Size, kind_of: KindOf) -> list[float]:
        """The future instants at which a duplicate may become allowed (a request turns late, or overdue).

        ``candidates``: the sources that could duplicate a piece (they hold it and may be asked).
        """
        out: list[float] = []
        for i, by in self._by.items():
            if len(by) >= self.copies:
                continue
            at, first = self._first(by)
            late = self._late_after(i, first, size, kind_of)
            # (request time, seconds after it): only a positive wait is an instant at which something changes.
            waits = [(at, late)]
            waits += [(t, own) for s, t in by.items() if (own := self.times.source(s, size(i))) is not None]
            mine = [m for c in candidates(i) if c not in by and (m := self.times.source(c, size(i))) is not None]
            if mine:
                waits += [(t, min(mine)) for t in by.values()]
                got, n = (0 if self.progress is None else self.progress(i)), size(i)
                if 0 < got < n and now >= at + waits[0][1]:  # late: when the rest would take longer, if it stopped now
                    waits.append((at, min(mine) * got / (n - got)))
            out += [t + w for t, w in waits if w > 0 and t + w > now]
        return out

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


class Endgame:
    """Picker rule 4 over the picker's sources: the piece a source may duplicate now, and when to look again.

    ``allowed(source, index, now)``: the picker's limits beyond holding the piece (wanted; for a mirror,
    the overlap budget and first-copy ownership). The piece times and requesters are ``asked``'s.
    """

    def __init__(self, asked: InFlight, sources: Mapping[str, Source], size: Size,
                 allowed: Callable[[Source, int, float], bool]) -> None:
        self._asked = asked
        self._sources = sources
        self._size = size
        self._allowed = allowed

    def kind_of(self, source_id: str) -> Hashable:
        return self._sources[source_id].kind

    def duplicators(self, index: int) -> Iterable[str]:
        """The sources that could be asked for ``index``."""
        return (sid for sid, src in self._sources.items() if src.may_ask(index))

    def pick(self, source_id: str, now: float) -> list[int]:
        """At most one REQUESTED piece for ``source_id`` to duplicate (InFlight.endgame_pick)."""
        src = self._sources[source_id]

        def may_send(i: int) -> bool:
            return src.may_ask(i) and self._allowed(src, i, now)

        i = self._asked.endgame_pick(source_id, may_send, now, self._size, self.kind_of)
        return [] if i is None else [i]

    def due(self, now: float) -> list[float]:
        """Instants after ``now`` at which a duplicate may become allowed (InFlight.endgame_due)."""
        return self._asked.endgame_due(now, self.duplicators, self._size, self.kind_of)
