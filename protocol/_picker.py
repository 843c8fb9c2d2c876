"""The piece picker: which piece to ask which source for. Pure: no IO, no clock.

Theory of operation (after libtorrent's ``piece_picker``)
--------------------------------------------------------
Every wanted piece is in one state:

    NONE --pick--> REQUESTED --written--> WRITING --committed--> DONE
      ^                |                     |
      +--- failed / cancelled (no requester left) / lost ----+

WRITING means "hash matched, bytes handed to the store, commit pending".
Only DONE counts as verified; a WRITING piece whose commit fails goes back to
NONE via :meth:`PiecePicker.piece_lost`.

Sources are either peers (a set of pieces that changes with HAVE messages),
mirrors (every piece) or local copies (a fixed set). The rules, in order:

1. A source is never asked for a piece whose bytes it already got wrong
   (integrity failure): that is permanent for the (source, piece) pair.
2. Peers pick rarest first: fewest peers holding the piece, ties by index.
   Wanted NONE pieces sit in availability buckets (peer count -> pieces,
   protocol/_availability.py), so a pick looks at the rarest bucket first
   instead of sorting every piece.
3. Mirrors only take pieces no known peer holds (back to source), except that
   ``mirror_overlap_budget`` pieces held by some peer may still come from a
   mirror (``None``: unlimited; the swarm uses 0 to keep origin egress low).
   Mirrors get one contiguous run inside one file, so a single Range request
   covers it (libtorrent's web-seed preference).
4. Endgame: once no wanted piece is NONE, a source may duplicate a piece that
   is REQUESTED (not WRITING) by others, oldest request first, up to
   ``endgame_copies`` concurrent requesters per piece, once the first request
   is late against this fetch's own piece times (``endgame_late`` × how long
   a piece of that size takes from that kind of source, never before
   ``endgame_delay``) and only to a source expected to finish it sooner than
   the outstanding request, judged by the bytes it has received so far where
   the caller reports them (``progress``): a request moving at this link's
   shared rate is left alone, a trickling or stalled one is duplicated
   (protocol/_requests.py keeps who was asked for what, since when, and the
   measured piece times; :meth:`piece_written` with ``now`` feeds them).
5. First-copy spreading (swarm fetches, a ``first_copy`` given): a mirror takes a piece
   only when protocol/_ownership.py says this node owns it or its owner is
   stale. :meth:`next_deadline` says when a stale owner's pieces become
   pickable, so the caller knows when to pick again.
6. Streaming (``stream_window`` set, for a reader that waits on the files,
   such as the Hub gateway): peers take the pieces of each file's readahead
   window first, nearest to the file's first missing piece, before rarest
   first; mirror runs start from the front of the files instead of the
   first-copy rank order, within the same ownership (protocol/_stream.py).

Time is a parameter: ``pick(..., now)`` records the request time so endgame
duplicates the piece that has waited longest, and ``piece_written(..., now=)``
measures how long each source took.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence

from ._availability import Availability
from ._ownership import MAX_PEER_CLAIMS, FirstCopy
from ._requests import Endgame, InFlight, Source
from ._runs import MirrorRuns
from ._stream import StreamOrder

__all__ = ["LOCAL", "MAX_PEER_CLAIMS", "MIRROR", "PEER", "PieceState", "PiecePicker", "SourceKind"]


class SourceKind(enum.Enum):
    """Where bytes come from. The picker prefers PEER to MIRROR; LOCAL is a copy from disk."""

    PEER = "peer"
    MIRROR = "mirror"
    LOCAL = "local"


PEER = SourceKind.PEER
MIRROR = SourceKind.MIRROR
LOCAL = SourceKind.LOCAL


class PieceState(enum.IntEnum):
    NONE = 0
    REQUESTED = 1
    WRITING = 2  # the hash matched and the bytes are with the store: commit pending
    DONE = 3


class PiecePicker:
    """Piece states, availability and in-flight bookkeeping for one fetch."""

    def __init__(
        self,
        sizes: Sequence[int],
        file_starts: Iterable[int] = (0,),
        *,
        have: Iterable[int] = (),
        wanted: Iterable[int] | None = None,
        endgame_copies: int = 2,
        mirror_overlap_budget: int | None = None,
        first_copy: FirstCopy | None = None,
        endgame_delay: float = 0.0,
        stream_window: int | None = None,
        endgame_late: float = 2.0,
        progress: Callable[[int], int] | None = None,
    ) -> None:
        self._sizes = list(sizes)
        file_starts = list(file_starts)
        n = len(self._sizes)
        self._state = [PieceState.NONE] * n
        self._wanted = [True] * n if wanted is None else [False] * n
        for i in wanted or ():
            self._wanted[i] = True
        for i in have:
            self._state[i] = PieceState.DONE
        self._avail = Availability(self._state, self._wanted, PieceState.NONE)
        self._asked = InFlight(endgame_copies, endgame_delay, endgame_late)
        self.progress = progress
        self._sources: dict[str, Source] = {}
        self._endgame = Endgame(self._asked, self._sources, self._sizes.__getitem__, self._endgame_allowed)
        self._remaining = sum(1 for i in range(n) if self._wanted[i] and self._state[i] != PieceState.DONE)
        #: First-copy spreading (None: every piece is ours to fetch). The caller
        #: holds it too and tells it about the swarm (members, claims, Haves).
        self.first_copy = first_copy
        #: Streaming order (rule 6; None: off).
        self.stream = None if stream_window is None else StreamOrder(self._sizes, file_starts, stream_window)
        order = list(range(n)) if self.first_copy is None else self.first_copy.run_order
        if self.stream is not None:
            order = self.stream.mirror_order(order)
        self._runs = MirrorRuns(self._sizes, file_starts, order, mirror_overlap_budget)

    @property
    def progress(self) -> Callable[[int], int] | None:
        """Bytes of a REQUESTED piece received so far by its furthest requester, as the caller sees them (endgame)."""
        return self._asked.progress

    @progress.setter
    def progress(self, fn: Callable[[int], int] | None) -> None:
        self._asked.progress = fn

    # -- queries ---------------------------------------------------------
    @property
    def piece_count(self) -> int:
        return len(self._sizes)

    @property
    def remaining(self) -> int:
        """Wanted pieces not yet DONE."""
        return self._remaining

    @property
    def is_complete(self) -> bool:
        return self._remaining == 0

    def state(self, index: int) -> PieceState:
        return self._state[index]

    def requesters(self, index: int) -> frozenset[str]:
        return self._asked.requesters(index)

    def peer_count(self, index: int) -> int:
        return self._avail.count[index]

    def in_flight(self, source_id: str) -> frozenset[int]:
        return frozenset(self._sources[source_id].in_flight)

    def has_source(self, source_id: str) -> bool:
        return source_id in self._sources

    def failed_pieces(self, source_id: str) -> frozenset[int]:
        return frozenset(self._sources[source_id].failed)

    def can_serve_missing(self) -> bool:
        """Whether some source could still provide every piece that is not DONE (False: the fetch cannot complete)."""
        srcs = self._sources.values()
        return all(any(s.has(i) and i not in s.failed for s in srcs) for i in range(len(self._state)) if self.wants(i))

    def break_runs_at(self, indices: Iterable[int]) -> None:
        """Mirror runs never continue into these pieces (a piece resumed mid-way starts its own run)."""
        self._runs.break_at(indices)

    # Predicates for the caller's FirstCopy (claims, progress), which knows nothing of piece states.
    def done(self, index: int) -> bool:
        return self._state[index] == PieceState.DONE

    def taken(self, index: int) -> bool:
        """Requested, being written or done (not NONE)."""
        return self._state[index] != PieceState.NONE

    def wants(self, index: int) -> bool:
        """A wanted piece that is not DONE yet (False out of range)."""
        return 0 <= index < len(self._state) and self._wanted[index] and self._state[index] != PieceState.DONE

    def expected_time(self, source_id: str, index: int) -> float | None:
        """Seconds a request of ``source_id`` for piece ``index`` is expected to take (None: none measured)."""
        return self._asked.times.source(source_id, self._sizes[index])

    def next_deadline(self, now: float | None = None) -> float | None:
        """When picking again may give more: a stale owner's pieces free up, or an endgame duplicate is due.

        With ``now``, only instants after it (an endgame request may turn late, or overdue, later).
        """
        times: list[float] = []
        if not self._avail.any_open():
            times += self._endgame.due(-float("inf") if now is None else now)
        if self.first_copy is not None:
            times += self.first_copy.deadlines(self._avail.open_pieces())
        if now is not None:
            times = [t for t in times if t > now]
        return min(times, default=None)

    # -- sources ---------------------------------------------------------
    def add_source(self, source_id: str, kind: SourceKind, have: Iterable[int] | None = None) -> None:
        if not isinstance(kind, SourceKind):
            raise ValueError(f"unknown source kind {kind!r}")
        if source_id in self._sources:
            raise ValueError(f"source {source_id!r} already added")
        src = Source(kind, None if have is None else set(have))
        self._sources[source_id] = src
        if kind is PEER and src.have is not None:
            self._avail.add(src.have, +1)

    def remove_source(self, source_id: str) -> list[int]:
        """Forget a source; returns the pieces it had in flight (released)."""
        src = self._sources[source_id]
        released = sorted(src.in_flight)
        for i in released:
            self._release(source_id, i)
        if src.kind is PEER and src.have is not None:
            self._avail.add(src.have, -1)
        del self._sources[source_id]
        self._asked.times.forget(source_id)
        return released

    def source_have(self, source_id: str, index: int) -> None:
        """A peer announced one more piece (HAVE)."""
        src = self._sources[source_id]
        if src.have is None or index in src.have:
            return
        src.have.add(index)
        if src.kind is PEER:
            self._avail.add_one(index, +1)

    def source_bitfield(self, source_id: str, indices: Iterable[int]) -> None:
        """Replace a peer's whole availability (handshake bitfield, or a peer that lost pieces)."""
        src = self._sources[source_id]
        new = set(indices)
        if src.kind is PEER:
            self._avail.replace(src.have or set(), new)
        src.have = new

    def _set_state(self, i: int, st: PieceState) -> None:
        was_open = self._avail.is_open(i)
        self._state[i] = st
        self._avail.state_changed(i, was_open)

    # -- picking ---------------------------------------------------------
    def pick(self, source_id: str, max_bytes: int, now: float) -> list[int]:
        """Choose pieces to request from ``source_id`` and mark them REQUESTED.

        Returns at least one piece when anything is pickable (even if it is
        larger than ``max_bytes``), or an empty list.
        """
        src = self._sources[source_id]
        if src.kind is MIRROR:
            picked = self._pick_run(src, max_bytes, now)
        else:
            picked = [] if self.stream is None else self.stream.pick(
                lambda i: not self.wants(i), lambda i: self._pickable(src, i), max_bytes)
            picked = picked or self._avail.rarest(src.have, src.failed, self._sizes, max_bytes)
        if not picked and not self._avail.any_open():
            picked = self._endgame.pick(source_id, now)
        for i in picked:
            self._mark_requested(source_id, src, i, now)
            if self.first_copy is not None:
                if src.kind is MIRROR:
                    self.first_copy.claim_mine(i)
                elif src.kind is PEER:
                    self.first_copy.requested(i, now)  # an owner's promise runs from here
        return picked

    def take(self, source_id: str, index: int, now: float) -> bool:
        """Mark one NONE piece REQUESTED by ``source_id`` outside :meth:`pick`.

        For a source that receives bytes it was not asked for (a mirror that
        ignores Range sends the whole file). False when the piece is not needed
        or not free.
        """
        src = self._sources[source_id]
        if not self._pickable(src, index):
            return False
        self._mark_requested(source_id, src, index, now)
        return True

    def _pickable(self, src: Source, i: int) -> bool:
        return self._wanted[i] and self._state[i] == PieceState.NONE and src.has(i) and i not in src.failed

    def _pick_run(self, src: Source, max_bytes: int, now: float) -> list[int]:
        return self._runs.pick(
            max_bytes, free=lambda i: self._pickable(src, i) and self._may_take(i, now), held=self._avail.count,
            any_unheld=self._avail.any_unheld(), endgame=not self._avail.any_open(),
        )

    def _may_take(self, i: int, now: float) -> bool:
        return self.first_copy is None or self.first_copy.mirror_may_take(i, now)

    def _endgame_allowed(self, src: Source, i: int, now: float) -> bool:
        """Rule 4 beyond holding the piece: a wanted piece, and for a mirror within rules 3 and 5."""
        if not self._wanted[i]:
            return False
        return src.kind is not MIRROR or ((self._runs.overlap_budget is None or self._avail.count[i] == 0) and self._may_take(i, now))

    def _mark_requested(self, source_id: str, src: Source, i: int, now: float) -> None:
        self._asked.add(i, source_id, now)
        src.in_flight.add(i)
        self._set_state(i, PieceState.REQUESTED)

    # -- outcomes --------------------------------------------------------
    def piece_written(self, source_id: str, index: int, now: float | None = None) -> frozenset[str]:
        """The hash matched and the bytes went to the store (commit pending).

        Returns the other sources that still have this piece requested
        (endgame duplicates); the caller may cancel those requests. ``now``
        measures the source's piece time (the endgame's lateness rule).
        """
        by = self._asked.clear(index)
        at = by.get(source_id)
        if now is not None and at is not None and source_id in self._sources:
            self._asked.times.sample(source_id, self._sources[source_id].kind, now - at, self._sizes[index])
        for sid in by:
            self._sources[sid].in_flight.discard(index)
        if self._state[index] != PieceState.DONE:
            self._set_state(index, PieceState.WRITING)
            if self.first_copy is not None:
                self.first_copy.delivered(source_id, index)
        return frozenset(by.keys() - {source_id})

    def piece_done(self, index: int) -> None:
        """The piece is durable and recorded: it counts as verified."""
        if self._state[index] == PieceState.DONE:
            return
        for sid in self._asked.clear(index):
            self._sources[sid].in_flight.discard(index)
        self._set_state(index, PieceState.DONE)
        if self.first_copy is not None:
            self.first_copy.piece_done(index)
        if self._wanted[index]:
            self._remaining -= 1

    def piece_lost(self, index: int) -> None:
        """A WRITING piece whose commit failed, or a DONE piece that no longer verifies."""
        if self._state[index] == PieceState.DONE and self._wanted[index]:
            self._remaining += 1
        if self._state[index] in (PieceState.DONE, PieceState.WRITING):
            self._set_state(index, PieceState.NONE)

    def piece_failed(self, source_id: str, index: int, *, integrity: bool) -> None:
        """A request for ``index`` from ``source_id`` ended without the piece.

        ``integrity=True`` (the bytes failed the hash) bars this source from
        this piece for good. Otherwise the piece may be retried anywhere.
        """
        if integrity:
            self._sources[source_id].failed.add(index)
        self._release(source_id, index)

    def cancel(self, source_id: str, indices: Iterable[int]) -> None:
        """Requests withdrawn without blame (endgame duplicates, shutdown)."""
        for i in indices:
            self._release(source_id, i)

    def _release(self, source_id: str, index: int) -> None:
        self._sources[source_id].in_flight.discard(index)
        if self._asked.remove(index, source_id) and self._state[index] == PieceState.REQUESTED:
            self._set_state(index, PieceState.NONE)

    # -- invariant -------------------------------------------------------
    def check_invariant(self) -> None:
        """Raise AssertionError when the bookkeeping disagrees with itself (tests call this)."""
        peers = [src.have for src in self._sources.values() if src.kind is PEER and src.have is not None]
        self._avail.check(peers)
        self._asked.check({sid: src.in_flight for sid, src in self._sources.items()}, self._state, PieceState.REQUESTED)
        remaining = sum(1 for i, st in enumerate(self._state) if self._wanted[i] and st != PieceState.DONE)
        assert remaining == self._remaining, (remaining, self._remaining)
