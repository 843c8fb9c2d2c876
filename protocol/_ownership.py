"""First-copy ownership: which node brings each piece into the swarm from a mirror. Pure: ``now`` is a parameter.

Theory of operation
-------------------
When several nodes fetch the same manifest, each piece has one *owner*
among this node and the peers that fetch it too (the members,
protocol/_membership.py), chosen by rendezvous hashing with bounded loads:
the id with the highest ``blake2b(id, index)`` among those that own fewer
than ``ceil(pieces / nodes)`` of the lower-indexed pieces. Every node that
sees the same members agrees without talking, each owns an even share, and
a member that leaves or joins moves little more than its own share.

A mirror may take a piece no peer holds only when this node owns it, or
when its owner is *stale*: slow, stuck or lying owners fall back to the
source. So N nodes started together each pull about 1/N of the model from
the mirror and trade the rest. An owner is stale when

* it has shown no progress for ``owner_timeout``. Progress is a Have for a
  piece it never advertised before that this node still wants: a repeated
  Have, or a Have for a piece this node already holds (anyone can echo our
  own Haves), is no progress; or
* it broke a promise: a piece it advertised (a Have that counted as
  progress) did not reach this node, from it or from anyone, within
  ``deliver_timeout`` of this node first *requesting* it from a peer (or of
  the Have, if later), or within ``unrequested_timeout`` of the Have if this
  node never got to request it (no peer that unchokes us held it, or our
  request slots stayed busy). A Have is a promise this node can check (the
  piece is then held by a peer and comes from peers), so an advertised
  piece that never arrives is a lie, or an owner that will not serve us.
  Either way its share is the mirror's from then on, for as long as it
  stays a member (a new session after ``member_grace`` starts afresh).

The promise clock starts at our request, not at the Have, because under
load (16 nodes on 2 cores) an honest owner's piece often waits for our
request slots, or for a peer that unchokes us, longer than it takes to
arrive once asked for; timing it from the Have moved honest shares to the
mirror (docs/benchmarks.md, the N=16 egress regression).

*Pieces already in the swarm*: a Have that is a promise (above) also
says that the piece's first copy is in the swarm, whoever's share it is.
No mirror takes that piece here, this node's own share included, until
the promise is due (``Promises.piece_due``: the first such Have, timed as
above), unless every member that sent one broke a promise since (a liar's
Haves hold nothing back). The record outlives the member, and so does a
claim (its copy is on its way): a holder or claimer whose session broke
(streams reset under load, and take longer than ``member_grace`` to come back) leaves the members
while its copy still reaches us through others, and without the record
the piece's rendezvous owner, now this node, took it from the mirror
again (docs/benchmarks.md, "Duplicate first copies at N=16"). What a
member that left holds back is due on the fixed timers
(``Promises.gone_due``; nobody is left to be merely slow), and a member
that broke a promise before it left holds nothing back. A piece no peer
delivers is late by at most that timeout, never stuck.

So a member that claims pieces and never delivers keeps its share (at most
``ceil(pieces / nodes)`` pieces plus ``MAX_PEER_CLAIMS`` claims) off the
mirror for at most ``owner_timeout`` (20 s) after it joins if it sends no
new Have; if it does, at most ``owner_timeout + deliver_timeout`` (40 s)
when it unchokes us (its piece is the rarest, so we ask for it at once
unless every request slot is busy), and ``owner_timeout +
unrequested_timeout`` (80 s) when it never does; the formal worst case, a
request at the last moment, is ``owner_timeout + unrequested_timeout +
deliver_timeout`` (100 s). tests/protocol/test_swarm_policy.py simulates
1, 3 and 9 such members, choking and unchoking, for an hour of simulated
time. The price for honest nodes: an owner whose advertised piece does not
reach us within ``deliver_timeout`` of our request (it chokes us, or its
upload is that slow) loses its share here to the mirror.

*Relayed members* (``set_members(..., relayed=...)``): once a swarm is
larger than one node's sessions, ranking only the sessions makes nodes
disagree (some pieces owned by nobody, most by several: about
N / (sessions + 1) first copies; bench/sim ``owners``). So the ranking also
takes the other fetchers this node knows of by gossip and has no session
with. Nodes that know the same swarm then agree on every owner whatever
their sessions. A relayed owner cannot send us a Have; its progress is
*relayed*: the first Have of one of its pieces from any session peer
counts as its progress and is a promise for it, kept or broken exactly as
above. A relayed member that never brings a piece in is stale after
``owner_timeout``, as a silent member is.

*Successors*: an owner that is stale but has delivered a verified piece to
this node (``delivered``; for a relayed owner, its piece reached us from a
peer) is honest and slow, not a liar. Its piece passes to the next member
in the piece's rendezvous order that is not stale and has delivered too
(or this node): every node that sees the same members agrees on it, so one
node takes the piece from a mirror instead of every node that was waiting.
The successor has ``owner_timeout`` to bring it in, then any node may. A
stale owner that never delivered anything to this node (a fake member
among them) loses its share to the mirror at once, as before, so the liar
bounds above are unchanged.

*The swarm's pace*: the fixed timers above (20 s) suit owners that bring
a piece in within seconds. In a fleet of edge devices at 20 Mbit/s an honest
owner's first copy shares its downlink with a dozen peer downloads and
shows only after 30-60 s; the fixed rule made every waiting node take it
from the mirror (14x origin egress at 50 nodes, docs/benchmarks.md). So
every timer is multiplied by ``scale()`` (protocol/_pace.py, ``Pace``
and ``pace_scale``): 1 while no
owner has shown a first copy (nothing says the swarm moves: a lone liar
gets the fixed bounds); while some have and others not yet, ``MAX_SCALE``
(8: 160 s); once every owner
has, ``PACE_FACTOR`` (4) times the longest gap an owner took before one
of its recent first copies, at least 1 and at most ``MAX_SCALE``. A first
copy is a progress Have (above) for a piece the sender owns. An owner that
sends Haves for pieces this node holds (it is receiving, only slowly) is
alive, not progressing: those keep it from going stale on the pace's
timeout, never for longer than ``MAX_SCALE x owner_timeout`` after its
last real progress. The promise timers stretch by the same scale, or to
``PACE_FACTOR`` times the median time this node's own peer requests take
to be served (a slow downlink makes every promise slow), within
``MAX_SCALE`` times ``deliver_timeout``. So owners that are merely slow
keep their pieces while the swarm is that slow, an owner that stops while
the others go on is stale after the pace's timeout (20 s in a fast swarm),
and one that leaves loses its pieces with its membership (its session, or
peer exchange's departure for a relayed member). The price: every liar
bound above is ``MAX_SCALE`` times longer when liars are owners that never
show among honest owners that do (they keep the pace unknown), e.g. 160 s
for a silent fake member.
``max_scale=1`` gives the fixed timers.

*Claims* override the hash: a member that says it asked a mirror for a
piece (the swarm's ``Claim`` message) owns it from then on, so nodes that
started before they knew of each other do not both bring the same first
copy in. When both asked, the smaller id keeps it (on both sides). A claim
lasts while its peer is a member; at most ``MAX_PEER_CLAIMS`` are honoured
per peer, and only a new Have counts as progress, so claims alone cannot
keep the mirror from a piece.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable, Sequence
from functools import cache, lru_cache

from ._pace import MAX_SCALE, PACE_FACTOR, PACE_QUANTILE, Pace, pace_scale

__all__ = ["MAX_PEER_CLAIMS", "MAX_SCALE", "PACE_FACTOR", "PACE_QUANTILE", "FirstCopy", "Promises", "pace_scale"]

MAX_PEER_CLAIMS = 64  # outstanding claims honoured per swarm peer
_SMALL_PIECE = 1 << 20  # pieces below this go first in a mirror's order


class FirstCopy:
    """Owners and claims of one manifest's pieces, as seen by node ``me``."""

    def __init__(
        self,
        me: str,
        sizes: Sequence[int],
        owner_timeout: float = 20.0,
        deliver_timeout: float | None = None,
        unrequested_timeout: float | None = None,
        *,
        max_scale: float = MAX_SCALE,
        pace_factor: float = PACE_FACTOR,
    ) -> None:
        self.me = me
        self._n = n = len(sizes)
        self._owner_timeout = owner_timeout
        self._deliver_timeout = owner_timeout if deliver_timeout is None else deliver_timeout
        self._unrequested_timeout = 3 * self._deliver_timeout if unrequested_timeout is None else unrequested_timeout
        self._owner: list[str] = [me] * n
        self._seen: dict[str, float] = {}  # member -> time of its last sign of progress
        self._advertised: dict[str, set[int]] = {}  # member -> pieces it sent a Have for
        # member -> piece -> when it advertised it (a Have that counted): not here yet; and when we first asked
        self._promises = Promises()
        self._lapsed: dict[str, float] = {}  # member -> when it broke a promise (stale from then on)
        self._claimed: dict[int, str] = {}  # piece -> member that asked a mirror for it
        self._ranks: dict[str, tuple[int, ...]] = {me: _ranks(me, n)}
        # Members known only by gossip (no session with this node): their
        # progress is relayed, i.e. a first Have of one of their pieces from
        # any session peer (see set_members).
        self._relayed: set[str] = set()
        # Members that brought this node a verified piece (or, relayed, whose piece came from a peer):
        # only they may be given a stale owner's piece, and only their pieces are passed on when stale.
        self._delivered: set[str] = set()
        self._order: dict[int, list[str]] = {}  # piece -> members by rendezvous weight (highest first), as needed
        # The swarm's pace (protocol/_pace.py): every timer above is multiplied by its scale.
        self.pace = Pace(owner_timeout, max_scale=max_scale, factor=pace_factor)
        self._alive: dict[str, float] = {}  # member -> its last first Have of any piece (wanted here or not)
        self._now = 0.0  # the latest time any call gave
        self._why: dict[int, str] = {}  # piece -> why a mirror last might take it (mirror_reason)
        # Where a mirror run starts: small pieces first (config and tokenizer
        # files: one round trip each, which must not be left for the end), then
        # our own pieces by rank (highest first): nodes that start before they
        # know of each other begin with different pieces, the ones each is most
        # likely to own once they do.
        ranks = self._ranks[me]
        self.run_order = sorted(range(n), key=lambda i: (sizes[i] >= _SMALL_PIECE, -ranks[i]))

    def owner(self, index: int) -> str:
        return self._claimed.get(index, self._owner[index])

    def members(self) -> frozenset[str]:
        """The other nodes sharing the first copy now."""
        return frozenset(p for p in self._ranks if p != self.me)

    def set_members(self, peers: Iterable[str], now: float, relayed: Iterable[str] = ()) -> bool:
        """The other nodes holding this manifest now; True when some piece changed owner.

        ``peers``: those in session with this node. ``relayed``: others that fetch or hold the manifest, known
        by gossip, with no session here (their pieces reach us through session peers). Both rank alike, so
        nodes with different sessions but the same gossiped swarm agree on every owner. A newly seen member
        counts as making progress from ``now``.
        """
        direct = set(peers) - {self.me}
        members = direct | (set(relayed) - {self.me})
        self._relayed = members - direct
        self._now = max(self._now, now)
        for p in members:
            self._seen.setdefault(p, now)
        if len(members) + 1 == len(self._ranks) and all(p in self._ranks for p in members):
            return False  # the same members (some moved between session and gossip): the same owners
        self._order.clear()
        for p in members:
            if p not in self._ranks:
                self._ranks[p] = _ranks(p, self._n)
        for p in [p for p in self._ranks if p != self.me and p not in members]:
            del self._ranks[p]
            self._seen.pop(p, None)
            self._alive.pop(p, None)
            self.pace.forget(p)
            self._advertised.pop(p, None)
            self._check_promises(p, now)
            self._promises.forget(p, keep=p not in self._lapsed)  # it left, it did not lie: its pieces are out there
            self._lapsed.pop(p, None)
            self._delivered.discard(p)
        self._claimed = {i: p for i, p in self._claimed.items() if p in members or p == self.me}
        owner = _shares(self._ranks, self._n)
        changed = owner != self._owner
        self._owner = owner
        self.pace.set_owners(set(owner) - {self.me})
        return changed

    def restart_clock(self, now: float) -> None:
        """This node's first request goes out now: every member counts as making progress from now.

        Members are known before that (waiting for discovery, or for the fleet: protocol/_rollout.py);
        that wait is nobody's silence (counted, it made owners stale while their first piece was on its way).
        """
        for p, t in self._seen.items():
            self._seen[p] = max(t, now)

    def peer_claims(self, peer: str, indices: Iterable[int], *, done: Callable[[int], bool], requested: Callable[[int], bool]) -> bool:
        """A member asked a mirror for these pieces: each is its own from now on (see ``_honour``).

        Ignored for non-members. Returns True when some piece changed owner.
        """
        if peer == self.me or peer not in self._ranks:
            return False
        new = _honour(self._claimed, self.me, peer, [i for i in indices if 0 <= i < self._n], done, requested)
        for i in new:
            self._promises.claimed(peer, i, self._now)
        return bool(new)

    def claims(self, peer: str) -> list[int]:
        """The pieces ``peer`` claimed (or this node, for ``me``), in index order."""
        return sorted(i for i, p in self._claimed.items() if p == peer)

    def claim_mine(self, index: int) -> None:
        """This node just asked a mirror for ``index``: ours, whatever a later membership says."""
        self._claimed[index] = self.me

    def my_claims(self, done: Callable[[int], bool]) -> list[int]:
        """Pieces this node asked a mirror for and has not finished (what a new member must hear)."""
        return sorted(i for i, p in self._claimed.items() if p == self.me and not done(i))

    def requested(self, index: int, now: float) -> None:
        """This node asked a peer for ``index``: a promise for it is due ``deliver_timeout`` from now (the first time)."""
        self._now = max(self._now, now)
        if 0 <= index < self._n:
            self._promises.requested(index, now)

    def delivered(self, source: str, index: int) -> None:
        """A peer source brought ``index`` and it verified: that member has shown it delivers.

        ``source``: a member id, or a peer source's ``peer:<id>[@alias]`` (node/swarm/session.py
        PeerSource.id). When the piece is a relayed owner's, the owner delivered too: its first copy reached us.
        """
        member = source.removeprefix("peer:").split("@", 1)[0]
        if member == self.me or member not in self._ranks:
            return
        who = [member]
        if 0 <= index < self._n and self.owner(index) in self._relayed:
            who.append(self.owner(index))
        for m in who:
            self._delivered.add(m)
            if not self._advertised.get(m):
                # A holder that sends no Haves (complete: a seed) shows itself by delivering, for the pace.
                self.pace.shown_by_delivery(m)

    def piece_done(self, index: int) -> None:
        """``index`` is here: no longer claimed, and delivered whoever advertised it."""
        self._claimed.pop(index, None)
        asked = self._promises.done(index)
        if asked is not None:
            self.pace.served(self._now - asked)  # how long our peer requests take to be served

    def progress(self, peer: str, index: int, now: float, *, wanted: bool) -> bool:
        """A member sent a Have for ``index``; True when it counts as progress.

        It counts only the first time this member names ``index`` and only when this node still ``wanted``
        the piece (not held here): then the member's pieces stay its own a while longer, and the piece must
        arrive within ``deliver_timeout`` of our request for it (``unrequested_timeout`` of now if none).
        """
        if peer not in self._seen or peer in self._relayed or not 0 <= index < self._n:
            return False
        o = self.owner(index)
        if o != peer and o in self._relayed:
            # Relayed progress: the first Have of a gossip-only owner's piece,
            # from anyone, is its progress and its promise (both as below).
            self._advance(o, index, now, wanted)
        return self._advance(peer, index, now, wanted)

    def _advance(self, peer: str, index: int, now: float, wanted: bool) -> bool:
        self._now = max(self._now, now)
        self._check_promises(peer, now)
        said = self._advertised.setdefault(peer, set())
        if index in said:
            return False
        said.add(index)
        self._alive[peer] = now  # a sign of life, not of progress: anyone can echo the pieces we hold
        if not wanted:
            return False
        if self.owner(index) == peer or self._owner[index] == peer:
            # One of its own first copies: the pace counts these only (how long owners take to show each).
            self.pace.first_copy(peer, now, self._seen[peer])
        self._seen[peer] = now
        self._promises.add(peer, index, now)
        return True

    def scale(self) -> float:
        """How many times the fixed timers an owner may take now, from the swarm's pace (see pace_scale)."""
        return self.pace.scale()

    def stale_at(self, peer: str) -> float | None:
        """When member ``peer`` is (or was) stale from, unless it makes progress first (None: not a member)."""
        seen = self._seen.get(peer)
        if seen is None:
            return None
        if peer in self._lapsed:
            return self._lapsed[peer]
        # Silent (no Have at all) for the pace's timeout, or no real progress for the longest one:
        # an owner that shows it is alive but slow keeps its pieces up to max_scale x owner_timeout.
        alive = max(seen, self._alive.get(peer, seen))
        t = min(alive + self._owner_timeout * self.scale(), seen + self._owner_timeout * self.pace.max_scale)
        due = self._promise_due(peer)
        return t if due is None else min(t, due)

    def mirror_may_take(self, index: int, now: float) -> bool:
        """Whether a mirror may fetch ``index`` now (peer holdings aside): ours, or its owner is stale.

        Never while a promise says the piece is in the swarm (``_swarm_due``).
        ``mirror_reason`` then says which rule let it.
        """
        self._now = max(self._now, now)
        o, why = self.owner(index), self._why
        if any(now < t for t in self._swarm_due([index])):
            return False  # a member advertised it: its first copy is in the swarm and comes from peers
        if o == self.me:
            why[index] = "claimed" if self._claimed.get(index) == o else "own share"
            return True
        self._check_promises(o, now)
        t = self.stale_at(o)
        if t is None:
            why[index] = "owner not a member"
        if t is None or now < t:
            return t is None
        why[index] = "owner broke a promise" if o in self._lapsed else "owner silent"
        # A stale owner's piece passes to its successor: the next member in the piece's rendezvous order
        # that is not stale (nodes that see the same members and staleness agree on it), which has
        # ``owner_timeout`` to bring it in before any node may take it from a mirror.
        if o not in self._delivered:
            why[index] += ", never delivered"  # its share is the mirror's at once (the liar bounds hold)
        elif self._successor(index, o, now) == self.me:
            why[index] += ", successor is me"
        elif now >= t + self._owner_timeout * self.scale():
            why[index] += ", successor late"
        else:
            return False
        return True

    def mirror_reason(self, index: int) -> str:
        """Why the last ``mirror_may_take(index)`` that said yes did, and whose share it is (diagnostics: logged)."""
        return f"{self._why.get(index, '?')} (share of {self._owner[index][-6:]}, heard {self._promises.heard(index)})"

    def _successor(self, index: int, owner: str, now: float) -> str:
        """The first member after ``owner`` in ``index``'s rendezvous order that is not stale now (or this node)."""
        order = self._order.get(index)
        if order is None:
            order = self._order[index] = sorted(self._ranks, key=lambda p: (self._ranks[p][index], p), reverse=True)
        for p in order:
            if p == self.me:
                return p
            if p == owner or p not in self._delivered:
                continue
            self._check_promises(p, now)
            t = self.stale_at(p)
            if t is not None and now < t:
                return p
        return self.me

    def _promise_due(self, peer: str) -> float | None:
        """When the first of ``peer``'s outstanding promises breaks (None: none outstanding)."""
        if not self._promises.outstanding(peer):
            return None
        deliver = self.pace.deliver(self._deliver_timeout)
        return self._promises.due(peer, deliver, self._unrequested_timeout * deliver / self._deliver_timeout)

    def _check_promises(self, peer: str, now: float) -> None:
        if peer in self._lapsed:
            return
        due = self._promise_due(peer)
        if due is not None and now >= due:
            self._lapsed[peer] = due

    def deadlines(self, pieces: Iterable[int]) -> list[float]:
        """When the owners of ``pieces`` go stale, or their promises are due (their pieces become the mirror's)."""
        pieces = list(pieces)
        owners = {self.owner(i) for i in pieces}
        times = [t for t in (self.stale_at(o) for o in owners) if t is not None]
        if len(self._ranks) > 2:  # a successor other than this node
            wait = self._owner_timeout * self.scale()
            times += [t + wait for t in times]
        return list(dict.fromkeys(times + self._swarm_due(pieces)))

    def _swarm_due(self, pieces: Iterable[int]) -> list[float]:
        """When the promises that brought ``pieces`` into the swarm are due: members' (paced), those that left (fixed)."""
        pieces = [i for i in pieces if self._promises.heard(i, any_record=True)]
        deliver = self.pace.deliver(self._deliver_timeout)
        unasked = self._unrequested_timeout * deliver / self._deliver_timeout

        @cache  # once per member per call: each check is a heap walk
        def credible(m: str) -> bool:
            self._check_promises(m, self._now)
            return m not in self._lapsed

        times = [self._promises.piece_due(i, deliver, unasked, credible) for i in pieces]
        times += [self._promises.gone_due(i, self._deliver_timeout, self._unrequested_timeout) for i in pieces]
        return [t for t in times if t is not None]


class Promises:
    """Each member's outstanding promises (pieces it advertised that are not here yet), and when each breaks.

    A promise for piece ``i`` advertised at ``have`` breaks ``deliver`` after
    ``max(have, asked)`` when this node asked a peer for ``i`` at ``asked``,
    else ``unasked`` after ``have`` (``FirstCopy._promise_due``). ``due``
    answers for a member in O(log n) amortised instead of a scan of its
    promises on every Have and every mirror pick: two heaps per member, one
    of ``max(have, asked)`` for the pieces asked for and one of ``have`` for
    the others, whose entries are checked against the promises when they
    reach the top (lazy deletion) and rebuilt when most are dead.
    """

    def __init__(self) -> None:
        self._pending: dict[str, dict[int, float]] = {}  # member -> piece -> when it advertised it
        self._asked: dict[int, float] = {}  # piece -> when this node first asked a peer for it
        self._heaps: dict[str, tuple[list[tuple[float, int]], list[tuple[float, int]]]] = {}  # (asked, unasked)
        self._by_piece: dict[int, dict[str, float]] = {}  # piece -> member -> when it advertised it
        self._gone: dict[int, float] = {}  # piece -> the first promise or claim for it by a member that left (kept)
        self._claims: dict[str, dict[int, float]] = {}  # member -> piece -> when it said it asked a mirror for it

    def outstanding(self, member: str) -> int:
        return len(self._pending.get(member, ()))

    def add(self, member: str, index: int, have: float) -> None:
        """``member`` advertised ``index`` at ``have`` (the first time counts)."""
        pending = self._pending.setdefault(member, {})
        if index in pending:
            return
        pending[index] = have
        self._by_piece.setdefault(index, {})[member] = have
        asked, unasked = self._heaps.setdefault(member, ([], []))
        a = self._asked.get(index)
        if a is None:
            heapq.heappush(unasked, (have, index))
        else:
            heapq.heappush(asked, (max(have, a), index))

    def requested(self, index: int, now: float) -> None:
        """This node asked a peer for ``index`` (the first time counts, until it is done)."""
        if index in self._asked:
            return
        self._asked[index] = now
        for member, pending in self._pending.items():
            have = pending.get(index)
            if have is not None:
                heapq.heappush(self._heaps[member][0], (max(have, now), index))

    def done(self, index: int) -> float | None:
        """``index`` is here: every promise for it is kept. Returns when this node first asked for it (None: never)."""
        for pending in [*self._pending.values(), *self._claims.values()]:
            pending.pop(index, None)
        self._by_piece.pop(index, None)
        self._gone.pop(index, None)
        return self._asked.pop(index, None)

    def heard(self, index: int, *, any_record: bool = False) -> str:
        """Who said ``index`` is in the swarm (Haves of members; a Have or claim of one that left), for diagnostics;
        with ``any_record``, "" when nobody did (the fast path of every mirror pick)."""
        haves = len(self._by_piece.get(index, ()))
        if any_record and not haves and index not in self._gone:
            return ""
        return f"{haves} have(s), {'a' if index in self._gone else 'no'} gone record"

    def claimed(self, member: str, index: int, at: float) -> None:
        """``member`` said at ``at`` that it asked a mirror for ``index`` (kept, like a promise, if it leaves)."""
        self._claims.setdefault(member, {})[index] = at

    def piece_due(self, index: int, deliver: float, unasked: float, credible: Callable[[str], bool]) -> float | None:
        """When the first promise for ``index`` by a ``credible`` member breaks (None: none)."""
        return self._due(index, [h for m, h in self._by_piece.get(index, {}).items() if credible(m)], deliver, unasked)

    def gone_due(self, index: int, deliver: float, unasked: float) -> float | None:
        """When the first promise or claim for ``index`` by a member that left breaks (None: none)."""
        return self._due(index, [self._gone[index]] if index in self._gone else [], deliver, unasked)

    def _due(self, index: int, haves: list[float], deliver: float, unasked: float) -> float | None:
        if not haves:
            return None
        asked = self._asked.get(index)
        return min(haves) + unasked if asked is None else max(min(haves), asked) + deliver

    def forget(self, member: str, *, keep: bool = False) -> None:
        """``member`` left; ``keep``: its promises still say the pieces are in the swarm (``piece_due``)."""
        for i, have in [*self._pending.pop(member, {}).items(), *self._claims.pop(member, {}).items()]:
            self._by_piece.get(i, {}).pop(member, None)
            if keep:
                self._gone[i] = min(have, self._gone.get(i, have))
        self._heaps.pop(member, None)

    def due(self, member: str, deliver: float, unasked: float) -> float | None:
        """When the first of ``member``'s promises breaks (None: none outstanding)."""
        pending = self._pending.get(member)
        if not pending:
            return None
        heaps = self._heaps[member]
        if len(heaps[0]) + len(heaps[1]) > 2 * len(pending) + 16:
            heaps = self._heaps[member] = self._rebuild(pending)
        asked, unasked_heap = heaps
        while asked:
            t, i = asked[0]
            have, a = pending.get(i), self._asked.get(i)
            if have is not None and a is not None and max(have, a) == t:
                break
            heapq.heappop(asked)
        while unasked_heap:
            t, i = unasked_heap[0]
            if pending.get(i) == t and i not in self._asked:
                break
            heapq.heappop(unasked_heap)
        times = ([asked[0][0] + deliver] if asked else []) + ([unasked_heap[0][0] + unasked] if unasked_heap else [])
        return min(times)

    def _rebuild(self, pending: dict[int, float]) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
        asked: list[tuple[float, int]] = []
        unasked: list[tuple[float, int]] = []
        for i, have in pending.items():
            a = self._asked.get(i)
            if a is None:
                unasked.append((have, i))
            else:
                asked.append((max(have, a), i))
        heapq.heapify(asked)
        heapq.heapify(unasked)
        return asked, unasked


def _honour(claimed: dict[int, str], me: str, peer: str, indices: Iterable[int],
            done: Callable[[int], bool], requested: Callable[[int], bool]) -> list[int]:
    """Record ``peer``'s claims in ``claimed`` (piece -> claimer); the pieces that changed owner.

    Pieces ``done`` here are skipped, and claims beyond ``MAX_PEER_CLAIMS``
    outstanding per peer. A piece we claimed and have ``requested`` stays
    ours if our id is smaller.
    """
    changed = []
    held = sum(1 for p in claimed.values() if p == peer)
    for i in indices:
        if done(i):
            continue
        if held >= MAX_PEER_CLAIMS:
            break
        cur = claimed.get(i)
        if cur == peer:
            continue
        if cur == me and requested(i) and me < peer:
            continue  # both asked a mirror for it: the smaller id keeps it, on both sides
        claimed[i] = peer
        held += 1
        changed.append(i)
    return changed


def _shares(ranks: dict[str, tuple[int, ...]], n: int) -> list[str]:
    """The owner of each of ``n`` pieces: rendezvous by ``ranks`` with bounded loads.

    Each node owns at most ceil(n / members) pieces, so the shares come out
    even (plain rendezvous leaves some nodes with twice the mean and the last
    of them alone on the mirror).
    """
    cols = list(ranks.items())
    cap = -(-n // len(cols))
    load = dict.fromkeys(ranks, 0)
    owner = []
    for i in range(n):
        o = max((c for c in cols if load[c[0]] < cap), key=lambda c: (c[1][i], c[0]))[0]
        load[o] += 1
        owner.append(o)
    return owner


@lru_cache(maxsize=4096)
def _ranks(peer: str, n: int) -> tuple[int, ...]:
    """Rendezvous weights of ``peer`` for pieces 0..n-1 (highest weight owns the piece); cached, as every fetch of a large swarm ranks the same ids."""
    key = peer.encode()
    return tuple(
        int.from_bytes(hashlib.blake2b(i.to_bytes(8, "big"), digest_size=8, key=key[:64]).digest(), "big")
        for i in range(n)
    )
