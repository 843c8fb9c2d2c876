"""One Kademlia lookup as a state machine: which peers to ask next, and when it is over.

Theory of operation. A lookup walks towards a 256-bit *target* point. It
keeps every peer it has heard of, sorted by XOR distance of the peer's point
to the target (points are SHA-256 of the key or of the peer id's bytes, the
keyspace py-libp2p's servers sort by). At most ``alpha`` queries are in
flight, always to the closest peers not yet asked among the ``k`` closest
that have not failed. Each answer brings closer peers (FIND_NODE and
GET_PROVIDERS both return them); each query has its own deadline, after
which the peer counts as failed and its slot goes to the next candidate, so
one silent peer costs one slot for ``query_timeout``, not the whole round
(py-libp2p's own lookup waits for the slowest query of every round).

The lookup is over when the ``need`` closest live peers it knows have all
answered, when nothing is left to ask, or when ``budget`` seconds have passed
since it started. ``need`` says what kind of walk it is:

- ``beta`` (the default; go-libp2p-kad-dht's resiliency): a FIND_NODE walk
  that wants the neighbourhood of the target, as the routing-table refresh
  does. Cheap: at 32 hosts to a 2-core machine asking all ``k`` closest
  pushed every walk past its budget.
- ``k``: a *full* walk, which ends only when the ``k`` closest live peers it
  knows (all it can reach, if fewer) have answered. ADD_PROVIDER uses it to
  place records on the true ``k`` closest, and GET_PROVIDERS starts as one:
  a record placed while its holder's routing table was still filling may sit
  on any of the ``k`` closest, not on the ``beta`` closest (a 12-host test
  failed that way once). :meth:`Lookup.found` then shortens it: the first
  result drops ``need`` to ``beta`` (one more hop's worth of closer peers
  may know more providers), ``enough`` results end it at once (``need`` 0),
  as libp2p's provider lookups end on enough providers or the ``k`` closest
  queried.

A peer whose query ran out of its ``query_timeout`` (not one that failed
outright) is asked once more, when the walk has nobody new to ask among the
``k`` closest and time is left: on a loaded machine a live peer's answer
took longer than 5 s often enough that a young node's provide walked to its
only seed, timed out, and ended with nobody to send its record to, 10 s of
its budget unused.

Sans-IO: the caller passes ``now`` in, starts the queries that
:meth:`Lookup.next_queries` returns, reports each outcome, and wakes up at
:meth:`Lookup.next_deadline` to call :meth:`Lookup.handle_timer`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Lookup", "LookupParams", "key_point"]


def key_point(data: bytes) -> bytes:
    """A key's or a peer id's place in the keyspace."""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class LookupParams:
    alpha: int = 3  # queries in flight
    k: int = 20  # closest peers a lookup converges on (and provider records go to)
    beta: int = 3  # closest peers that must answer before a FIND_NODE walk (or a provider walk with results) stops
    query_timeout: float = 5.0  # one peer's answer
    budget: float = 15.0  # the whole lookup
    max_candidates: int = 80  # peers kept (the closest); a hostile answer cannot grow it further


_NEW, _ASKED, _ANSWERED, _FAILED = range(4)


class Lookup:
    """An iterative lookup of ``target`` (a 32-byte point), seeded with known peers."""

    def __init__(self, target: bytes, seeds: Iterable[tuple[str, bytes]], now: float,
                 params: LookupParams = LookupParams(), exclude: Iterable[str] = (),
                 need: int | None = None) -> None:
        self.params = params
        self.need = params.beta if need is None else need
        self._target = int.from_bytes(target, "big")
        self._dist: dict[str, int] = {}
        self._state: dict[str, int] = {}
        self._sent: dict[str, float] = {}
        self._exclude = set(exclude)
        self._retry: set[str] = set()  # timed out once: may be asked once more
        self._retried: set[str] = set()
        self._deadline = now + params.budget
        self.timed_out = False
        self.queries = 0
        self.answers = 0
        self._add(seeds)

    # -- inputs -----------------------------------------------------------------
    def _add(self, peers: Iterable[tuple[str, bytes]]) -> None:
        for peer, point in peers:
            if peer in self._state or peer in self._exclude or len(point) != 32:
                continue
            self._dist[peer] = self._target ^ int.from_bytes(point, "big")
            self._state[peer] = _NEW
        if len(self._state) > self.params.max_candidates:
            # Drop the farthest peers nobody has asked yet.
            keep = sorted(self._state, key=self._dist.__getitem__)
            for peer in keep[self.params.max_candidates:]:
                if self._state[peer] == _NEW:
                    del self._state[peer], self._dist[peer]

    def on_response(self, peer: str, closer: Iterable[tuple[str, bytes]], now: float) -> None:
        """``peer`` answered, naming ``closer`` peers (id, point)."""
        if self._state.get(peer) != _ASKED:
            return
        self._state[peer] = _ANSWERED
        self._sent.pop(peer, None)
        self.answers += 1
        self._add(closer)

    def found(self, results: int, enough: int) -> None:
        """The caller holds ``results`` results (providers) so far; it wants ``enough``.

        Any result shortens a full walk to the ``beta`` closest; ``enough``
        ends it at once. ``need`` never grows back.
        """
        if results >= enough:
            self.need = 0
        elif results > 0:
            self.need = min(self.need, self.params.beta)

    def on_failure(self, peer: str, now: float) -> None:
        if self._state.get(peer) == _ASKED:
            self._state[peer] = _FAILED
            self._sent.pop(peer, None)

    def handle_timer(self, now: float) -> None:
        for peer, sent in list(self._sent.items()):
            if now >= sent + self.params.query_timeout:
                self.on_failure(peer, now)
                if peer not in self._retried:
                    self._retry.add(peer)
        if now >= self._deadline:
            self.timed_out = True

    # -- outputs ----------------------------------------------------------------
    def _live(self) -> list[str]:
        return sorted((p for p, s in self._state.items() if s != _FAILED), key=self._dist.__getitem__)

    def next_queries(self, now: float) -> list[str]:
        """Peers to ask now (each marked as asked); empty once done or while alpha are in flight."""
        if self.done:
            return []
        out = []
        slots = self.params.alpha - len(self._sent)
        for peer in self._live()[: self.params.k]:
            if slots <= 0:
                break
            if self._state[peer] == _NEW:
                self._state[peer] = _ASKED
                self._sent[peer] = now
                self.queries += 1
                out.append(peer)
                slots -= 1
        if slots > 0 and not self._has_new():
            # Nobody new to ask: a peer that only ran out of time gets one more try, closest first.
            for peer in sorted(self._retry, key=self._dist.__getitem__)[:slots]:
                self._retry.discard(peer)
                self._retried.add(peer)
                self._state[peer] = _ASKED
                self._sent[peer] = now
                self.queries += 1
                out.append(peer)
        return out

    def _has_new(self) -> bool:
        return any(self._state[p] == _NEW for p in self._live()[: self.params.k])

    def next_deadline(self) -> float:
        return min([self._deadline, *(t + self.params.query_timeout for t in self._sent.values())])

    @property
    def done(self) -> bool:
        if self.timed_out:
            return True
        if self.need <= 0:
            return True
        closest = self._live()[: self.need]
        if closest and all(self._state[p] == _ANSWERED for p in closest):
            # Fewer live peers than it needs: not over while a timed-out peer may yet answer.
            if len(closest) >= self.need or not self._retry:
                return True
        # Nothing left to ask (or to ask again) and nothing in flight: the walk cannot get further.
        return not self._sent and not self._retry and not self._has_new()

    def closest(self, count: int | None = None) -> list[str]:
        """The closest peers that answered, nearest first."""
        answered = [p for p in self._live() if self._state[p] == _ANSWERED]
        return answered[: self.params.k if count is None else count]

    def known_closest(self, count: int | None = None) -> list[str]:
        """The closest peers not known to have failed (answered, asked or not yet), nearest first."""
        return self._live()[: self.params.k if count is None else count]

    def in_flight(self) -> int:
        return len(self._sent)
