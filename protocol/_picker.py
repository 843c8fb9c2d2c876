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
   Wanted NONE pieces sit in availability buckets (peer count -> pieces), so
   a pick looks at the rarest bucket first instead of sorting every piece.
3. Mirrors only take pieces no known peer holds (back to source), except that
   ``mirror_overlap_budget`` pieces held by some peer may still come from a
   mirror (``None``: unlimited; the swarm uses 0 to keep origin egress low).
   Mirrors get one contiguous run inside one file, so a single Range request
   covers it (libtorrent's web-seed preference).
4. Endgame: once no wanted piece is NONE, a source may duplicate a piece that
   is REQUESTED (not WRITING) by others, oldest request first, up to
   ``endgame_copies`` concurrent requesters per piece, once the first request
   is ``endgame_delay`` old (a swarm on a LAN gets a piece from a peer in tens
   of milliseconds; duplicating it at once only doubles the work of the last
   pieces on every node).
5. First-copy spreading (swarm fetches, ``me`` set): a mirror takes a piece
   only when protocol/_ownership.py says this node owns it or its owner is
   stale. :meth:`next_deadline` says when a stale owner's pieces become
   pickable, so the caller knows when to pick again.

Time is a parameter: ``pick(..., now)`` records the request time so endgame
duplicates the piece that has waited longest.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ._ownership import MAX_PEER_CLAIMS, FirstCopy

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


@dataclass(slots=True)
class _Source:
    kind: SourceKind
    have: set[int] | None  # None: every piece
    failed: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)

    def has(self, index: int) -> bool:
        return self.have is None or index in self.have


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
        me: str | None = None,
        owner_timeout: float = 20.0,
        endgame_delay: float = 0.0,
    ) -> None:
        self._sizes = list(sizes)
        n = len(self._sizes)
        self._file_starts = set(file_starts)
        self._state = [PieceState.NONE] * n
        self._wanted = [True] * n if wanted is None else [False] * n
        if wanted is not None:
            for i in wanted:
                self._wanted[i] = True
        for i in have:
            self._state[i] = PieceState.DONE
        self._peer_count = [0] * n
        # Availability buckets: peer count -> the wanted NONE pieces with that count.
        self._buckets: dict[int, set[int]] = {}
        self._bulk = max(n // 16, 64)  # more changes than this at once: rebuild the buckets
        self._rebuild_buckets()
        self._requested_by: dict[int, set[str]] = {}
        self._requested_at: dict[int, float] = {}
        self._sources: dict[str, _Source] = {}
        self._endgame_copies = endgame_copies
        self._endgame_delay = endgame_delay
        self._overlap_budget = mirror_overlap_budget
        self._remaining = sum(1 for i in range(n) if self._wanted[i] and self._state[i] != PieceState.DONE)
        #: First-copy spreading (None: every piece is ours to fetch).
        self.first_copy = None if me is None else FirstCopy(me, self._sizes, owner_timeout)
        self._run_order = list(range(n)) if self.first_copy is None else self.first_copy.run_order

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
        return frozenset(self._requested_by.get(index, ()))

    def peer_count(self, index: int) -> int:
        return self._peer_count[index]

    def in_flight(self, source_id: str) -> frozenset[int]:
        return frozenset(self._sources[source_id].in_flight)

    def has_source(self, source_id: str) -> bool:
        return source_id in self._sources

    def failed_pieces(self, source_id: str) -> frozenset[int]:
        return frozenset(self._sources[source_id].failed)

    def can_serve_missing(self) -> bool:
        """Whether some source could still provide every piece that is not DONE.

        False means the fetch cannot complete with the current sources.
        """
        for i, st in enumerate(self._state):
            if not self._wanted[i] or st == PieceState.DONE:
                continue
            if not any(s.has(i) and i not in s.failed for s in self._sources.values()):
                return False
        return True

    def break_runs_at(self, indices: Iterable[int]) -> None:
        """Mirror runs never continue into these pieces (a piece resumed mid-way starts its own run)."""
        self._file_starts.update(indices)

    # -- first-copy spreading (protocol/_ownership.py) ----------------------
    def owner(self, index: int) -> str | None:
        """Which node should bring ``index`` into the swarm from a mirror (None: no spreading)."""
        return None if self.first_copy is None else self.first_copy.owner(index)

    def set_swarm(self, peers: Iterable[str], now: float, complete: Iterable[str] = ()) -> bool:
        """The other nodes holding this manifest now (swarm peer ids, not source ids).

        ``complete`` peers hold every piece and keep their share: it comes
        from them (or whoever they served) once they unchoke us; a complete
        peer that chokes us for ``owner_timeout`` goes stale like any other
        owner (it sends no Have), so a peer that claims everything and serves
        nothing cannot keep the mirror from its share. Returns True when some
        piece changed owner.
        """
        if self.first_copy is None:
            return False
        return self.first_copy.set_members([*peers, *complete], now)

    def peer_claims(self, peer: str, indices: Iterable[int]) -> bool:
        """A swarm peer asked a mirror for these pieces (see FirstCopy.peer_claims)."""
        if self.first_copy is None:
            return False
        return self.first_copy.peer_claims(
            peer, indices, done=lambda i: self._state[i] == PieceState.DONE,
            requested=lambda i: self._state[i] != PieceState.NONE,
        )

    def my_claims(self) -> list[int]:
        """Pieces this node asked a mirror for and has not yet finished (what a new member must hear)."""
        if self.first_copy is None:
            return []
        return self.first_copy.my_claims(lambda i: self._state[i] == PieceState.DONE)

    def peer_progress(self, peer: str, index: int, now: float) -> bool:
        """A swarm peer sent a HAVE for ``index``; True when it counts as progress (see FirstCopy.progress)."""
        if self.first_copy is None or not 0 <= index < len(self._state):
            return False
        wanted = self._wanted[index] and self._state[index] != PieceState.DONE
        return self.first_copy.progress(peer, index, now, wanted=wanted)

    def mirror_may_take(self, index: int, now: float) -> bool:
        """Whether the first-copy rule lets a mirror fetch ``index`` now (peer holdings aside)."""
        return self.first_copy is None or self.first_copy.mirror_may_take(index, now)

    def next_deadline(self) -> float | None:
        """When picking again may give more: a stale owner's pieces free up, or an endgame duplicate is due."""
        times: list[float] = []
        if self._endgame_delay > 0 and self._in_endgame():
            times += [t + self._endgame_delay for i, t in self._requested_at.items() if self._state[i] == PieceState.REQUESTED]
        if self.first_copy is not None:
            times += self.first_copy.deadlines(i for b in self._buckets.values() for i in b)
        return min(times, default=None)

    # -- sources ---------------------------------------------------------
    def add_source(self, source_id: str, kind: SourceKind, have: Iterable[int] | None = None) -> None:
        if not isinstance(kind, SourceKind):
            raise ValueError(f"unknown source kind {kind!r}")
        if source_id in self._sources:
            raise ValueError(f"source {source_id!r} already added")
        src = _Source(kind, None if have is None else set(have))
        self._sources[source_id] = src
        if kind is PEER and src.have is not None:
            self._recount(src.have, +1)

    def remove_source(self, source_id: str) -> list[int]:
        """Forget a source; returns the pieces it had in flight (released)."""
        src = self._sources[source_id]
        released = sorted(src.in_flight)
        for i in released:
            self._release(source_id, i)
        if src.kind is PEER and src.have is not None:
            self._recount(src.have, -1)
        del self._sources[source_id]
        return released

    def source_have(self, source_id: str, index: int) -> None:
        """A peer announced one more piece (HAVE)."""
        src = self._sources[source_id]
        if src.have is None or index in src.have:
            return
        src.have.add(index)
        if src.kind is PEER:
            self._count(index, +1)

    def source_bitfield(self, source_id: str, indices: Iterable[int]) -> None:
        """Replace a peer's whole availability (handshake bitfield, or a peer that lost pieces)."""
        src = self._sources[source_id]
        new = set(indices)
        if src.kind is PEER:
            old = src.have or set()
            gone, came = old - new, new - old
            if len(gone) + len(came) > self._bulk:
                for i in gone:
                    self._peer_count[i] -= 1
                for i in came:
                    self._peer_count[i] += 1
                self._rebuild_buckets()
            else:
                self._recount(gone, -1)
                self._recount(came, +1)
        src.have = new

    # -- availability buckets ------------------------------------------------
    def _open(self, i: int) -> bool:
        """In a bucket: wanted and NONE."""
        return self._wanted[i] and self._state[i] is PieceState.NONE

    def _rebuild_buckets(self) -> None:
        # After a bulk change (a peer joins, leaves or sends a whole bitfield):
        # fresh sets, since a set that once held many pieces keeps its large
        # table, and intersecting it would cost its old size on every pick.
        buckets: dict[int, set[int]] = {}
        none, state, wanted = PieceState.NONE, self._state, self._wanted
        for i, c in enumerate(self._peer_count):
            if state[i] is none and wanted[i]:
                b = buckets.get(c)
                if b is None:
                    b = buckets[c] = set()
                b.add(i)
        self._buckets = buckets

    def _recount(self, pieces: Iterable[int], delta: int) -> None:
        """A peer gained (+1) or lost (-1) these pieces: one move each, or a rebuild when there are many."""
        pieces = pieces if isinstance(pieces, set | frozenset) else set(pieces)
        if len(pieces) > self._bulk:
            for i in pieces:
                self._peer_count[i] += delta
            self._rebuild_buckets()
        else:
            for i in pieces:
                self._count(i, delta)

    def _count(self, i: int, delta: int) -> None:
        c = self._peer_count[i]
        self._peer_count[i] = c + delta
        if self._open(i):
            self._bucket_remove(i, c)
            self._buckets.setdefault(c + delta, set()).add(i)

    def _bucket_remove(self, i: int, c: int) -> None:
        b = self._buckets[c]
        b.discard(i)
        if not b:
            del self._buckets[c]

    def _set_state(self, i: int, st: PieceState) -> None:
        was_open = self._open(i)
        self._state[i] = st
        if was_open and st != PieceState.NONE:
            self._bucket_remove(i, self._peer_count[i])
        elif not was_open and self._open(i):
            self._buckets.setdefault(self._peer_count[i], set()).add(i)

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
            picked = self._pick_rarest(src, max_bytes)
        if not picked and self._in_endgame():
            picked = self._pick_endgame(source_id, src, now)
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

    def _pickable(self, src: _Source, i: int) -> bool:
        return self._wanted[i] and self._state[i] == PieceState.NONE and src.has(i) and i not in src.failed

    def _pick_rarest(self, src: _Source, max_bytes: int) -> list[int]:
        out: list[int] = []
        total = 0
        for c in sorted(self._buckets):
            bucket = self._buckets[c]
            cands = bucket if src.have is None else (bucket & src.have if len(bucket) > len(src.have) else src.have & bucket)
            if src.failed:
                cands = cands - src.failed
            if not cands:
                continue
            # One piece (a peer's usual request) needs no sort.
            order = [min(cands)] if self._sizes[min(cands)] >= max_bytes and not out else sorted(cands)
            for i in order:
                if out and total + self._sizes[i] > max_bytes:
                    return out
                out.append(i)
                total += self._sizes[i]
            if total >= max_bytes:
                return out
        return out

    def _pick_run(self, src: _Source, max_bytes: int, now: float) -> list[int]:
        n = len(self._sizes)

        def fresh(i: int) -> bool:
            return self._pickable(src, i) and self._peer_count[i] == 0 and self.mirror_may_take(i, now)

        start = next((i for i in self._run_order if fresh(i)), None) if self._buckets.get(0) else None
        overlap = False
        if start is None and (self._overlap_budget is None or self._overlap_budget > 0) and not self._in_endgame():
            start = next((i for i in self._run_order if self._pickable(src, i) and self.mirror_may_take(i, now)), None)
            overlap = True
        if start is None:
            return []
        run = [start]
        total = self._sizes[start]
        i = start + 1
        while i < n and i not in self._file_starts and self._pickable(src, i) and self.mirror_may_take(i, now):
            if not overlap and self._peer_count[i] > 0:
                break
            if total + self._sizes[i] > max_bytes:
                break
            run.append(i)
            total += self._sizes[i]
            i += 1
        if overlap and self._overlap_budget is not None:
            run = run[: self._overlap_budget]
            self._overlap_budget -= len(run)
        return run

    def _in_endgame(self) -> bool:
        """No wanted piece is NONE (every bucket is empty)."""
        return not any(self._buckets.values())

    def _pick_endgame(self, source_id: str, src: _Source, now: float) -> list[int]:
        cands = [
            (self._requested_at.get(i, 0.0), i)
            for i in self._requested_by
            if self._wanted[i]
            and src.has(i)
            and i not in src.failed
            and source_id not in self._requested_by[i]
            and len(self._requested_by[i]) < self._endgame_copies
            and now - self._requested_at.get(i, 0.0) >= self._endgame_delay
        ]
        if src.kind is MIRROR and self._overlap_budget is not None:
            cands = [c for c in cands if self._peer_count[c[1]] == 0]
        if src.kind is MIRROR:
            cands = [c for c in cands if self.mirror_may_take(c[1], now)]
        return [min(cands)[1]] if cands else []

    def _mark_requested(self, source_id: str, src: _Source, i: int, now: float) -> None:
        by = self._requested_by.setdefault(i, set())
        if not by:
            self._requested_at[i] = now
        by.add(source_id)
        src.in_flight.add(i)
        self._set_state(i, PieceState.REQUESTED)

    # -- outcomes --------------------------------------------------------
    def piece_written(self, source_id: str, index: int) -> frozenset[str]:
        """The hash matched and the bytes went to the store (commit pending).

        Returns the other sources that still have this piece requested
        (endgame duplicates); the caller may cancel those requests.
        """
        others = frozenset(self._requested_by.get(index, set()) - {source_id})
        for sid in list(self._requested_by.get(index, ())):
            self._sources[sid].in_flight.discard(index)
        self._requested_by.pop(index, None)
        self._requested_at.pop(index, None)
        if self._state[index] != PieceState.DONE:
            self._set_state(index, PieceState.WRITING)
        return others

    def piece_done(self, index: int) -> None:
        """The piece is durable and recorded: it counts as verified."""
        if self._state[index] == PieceState.DONE:
            return
        for sid in list(self._requested_by.get(index, ())):
            self._sources[sid].in_flight.discard(index)
        self._requested_by.pop(index, None)
        self._requested_at.pop(index, None)
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
        src = self._sources[source_id]
        src.in_flight.discard(index)
        by = self._requested_by.get(index)
        if by is not None:
            by.discard(source_id)
            if not by:
                del self._requested_by[index]
                self._requested_at.pop(index, None)
                if self._state[index] == PieceState.REQUESTED:
                    self._set_state(index, PieceState.NONE)

    # -- invariant -------------------------------------------------------
    def check_invariant(self) -> None:
        """Raise AssertionError when the bookkeeping disagrees with itself (tests call this)."""
        n = len(self._sizes)
        counts = [0] * n
        for sid, src in self._sources.items():
            if src.kind is PEER and src.have is not None:
                for i in src.have:
                    counts[i] += 1
            for i in src.in_flight:
                assert sid in self._requested_by.get(i, ()), (sid, i)
        assert counts == self._peer_count, "peer counts drifted"
        for i, by in self._requested_by.items():
            assert by, i
            assert self._state[i] == PieceState.REQUESTED, (i, self._state[i])
            for sid in by:
                assert i in self._sources[sid].in_flight, (sid, i)
        for i, st in enumerate(self._state):
            if st == PieceState.REQUESTED:
                assert self._requested_by.get(i), i
        remaining = sum(1 for i in range(n) if self._wanted[i] and self._state[i] != PieceState.DONE)
        assert remaining == self._remaining, (remaining, self._remaining)
        bucketed = {i: c for c, b in self._buckets.items() for i in b}
        assert sum(len(b) for b in self._buckets.values()) == len(bucketed), "a piece in two buckets"
        assert bucketed == {i: self._peer_count[i] for i in range(n) if self._open(i)}, "buckets drifted"
