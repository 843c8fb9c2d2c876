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
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

__all__ = ["MAX_PEER_CLAIMS", "FirstCopy"]

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
    ) -> None:
        self.me = me
        self._n = n = len(sizes)
        self._owner_timeout = owner_timeout
        self._deliver_timeout = owner_timeout if deliver_timeout is None else deliver_timeout
        self._unrequested_timeout = 3 * self._deliver_timeout if unrequested_timeout is None else unrequested_timeout
        self._owner: list[str] = [me] * n
        self._seen: dict[str, float] = {}  # member -> time of its last sign of progress
        self._advertised: dict[str, set[int]] = {}  # member -> pieces it sent a Have for
        # member -> piece -> when it advertised it (a Have that counted): not here yet
        self._pending: dict[str, dict[int, float]] = {}
        self._lapsed: dict[str, float] = {}  # member -> when it broke a promise (stale from then on)
        self._requested: dict[int, float] = {}  # piece -> when this node first asked a peer for it
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

        ``peers``: those in session with this node. ``relayed``: others that
        fetch or hold the manifest, known by gossip, with no session here
        (their pieces reach this node through session peers). Both rank
        alike, so nodes with different sessions but the same gossiped swarm
        agree on every owner. A newly seen member counts as making progress
        from ``now``.
        """
        direct = set(peers) - {self.me}
        members = direct | (set(relayed) - {self.me})
        self._relayed = members - direct
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
            self._advertised.pop(p, None)
            self._pending.pop(p, None)
            self._lapsed.pop(p, None)
            self._delivered.discard(p)
        self._claimed = {i: p for i, p in self._claimed.items() if p in members or p == self.me}
        # Bounded loads: each node owns at most ceil(n / members) pieces, so
        # the shares come out even (plain rendezvous leaves some nodes with
        # twice the mean and the last of them alone on the mirror).
        cols = list(self._ranks.items())
        cap = -(-self._n // len(cols))
        load = dict.fromkeys(self._ranks, 0)
        owner = []
        for i in range(self._n):
            o = max((c for c in cols if load[c[0]] < cap), key=lambda c: (c[1][i], c[0]))[0]
            load[o] += 1
            owner.append(o)
        changed = owner != self._owner
        self._owner = owner
        return changed

    def restart_clock(self, now: float) -> None:
        """This node's first request goes out now: every member counts as making progress from now.

        Members are known before that (a fetch is attached while it waits for
        its peers: discovery, or an update waiting for the rest of the fleet,
        protocol/_rollout.py); the time spent waiting is nobody's silence, and
        counting it made owners stale while their first piece was on its way.
        """
        for p, t in self._seen.items():
            self._seen[p] = max(t, now)

    def peer_claims(self, peer: str, indices: Iterable[int], *, done: Callable[[int], bool], requested: Callable[[int], bool]) -> bool:
        """A member asked a mirror for these pieces: each is its own from now on.

        Ignored for non-members, for pieces out of range or ``done`` here and
        beyond ``MAX_PEER_CLAIMS`` outstanding claims per peer. A piece we
        claimed and have ``requested`` stays ours if our id is smaller.
        Returns True when some piece changed owner.
        """
        me = self.me
        if peer == me or peer not in self._ranks:
            return False
        changed = False
        held = sum(1 for p in self._claimed.values() if p == peer)
        for i in indices:
            if not 0 <= i < self._n or done(i):
                continue
            if held >= MAX_PEER_CLAIMS:
                break
            cur = self._claimed.get(i)
            if cur == peer:
                continue
            if cur == me and requested(i) and me < peer:
                continue  # both asked a mirror for it: the smaller id keeps it, on both sides
            self._claimed[i] = peer
            held += 1
            changed = True
        return changed

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
        if 0 <= index < self._n:
            self._requested.setdefault(index, now)

    def delivered(self, source: str, index: int) -> None:
        """A peer source brought ``index`` and it verified: that member has shown it delivers.

        ``source`` is the picker's source id: a member id, or a peer source's
        ``peer:<id>`` (``peer:<id>@alias`` for identical files held under
        another manifest; node/swarm/session.py PeerSource.id). When the piece
        is a relayed owner's, the owner delivered too: its first copy reached us.
        """
        member = source.removeprefix("peer:").split("@", 1)[0]
        if member == self.me or member not in self._ranks:
            return
        self._delivered.add(member)
        if 0 <= index < self._n and self.owner(index) in self._relayed:
            self._delivered.add(self.owner(index))

    def piece_done(self, index: int) -> None:
        """``index`` is here: no longer claimed, and delivered whoever advertised it."""
        self._claimed.pop(index, None)
        self._requested.pop(index, None)
        for pending in self._pending.values():
            pending.pop(index, None)

    def progress(self, peer: str, index: int, now: float, *, wanted: bool) -> bool:
        """A member sent a Have for ``index``; True when it counts as progress.

        It counts only the first time this member names ``index`` and only
        when this node still ``wanted`` the piece (not held here): then the
        member's pieces stay its own a while longer, and the piece must
        arrive here within ``deliver_timeout`` of this node requesting it
        (``unrequested_timeout`` of now if it never does).
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
        self._check_promises(peer, now)
        said = self._advertised.setdefault(peer, set())
        if index in said:
            return False
        said.add(index)
        if not wanted:
            return False
        self._seen[peer] = now
        self._pending.setdefault(peer, {}).setdefault(index, now)
        return True

    def stale_at(self, peer: str) -> float | None:
        """When member ``peer`` is (or was) stale from, unless it makes progress first (None: not a member)."""
        seen = self._seen.get(peer)
        if seen is None:
            return None
        if peer in self._lapsed:
            return self._lapsed[peer]
        t = seen + self._owner_timeout
        due = self._promise_due(peer)
        return t if due is None else min(t, due)

    def mirror_may_take(self, index: int, now: float) -> bool:
        """Whether a mirror may fetch ``index`` now (peer holdings aside): ours, or its owner is stale."""
        o = self.owner(index)
        if o == self.me:
            return True
        self._check_promises(o, now)
        t = self.stale_at(o)
        if t is None:
            return True
        if now < t:
            return False
        # A stale owner's piece passes to its successor: the next member in
        # the piece's rendezvous order that is not stale (nodes that see the
        # same members and staleness agree on it), which has ``owner_timeout``
        # to bring it in before any node may take it from a mirror.
        if o not in self._delivered:
            return True  # never brought us a piece: its share is the mirror's at once (the liar bounds hold)
        return self._successor(index, o, now) == self.me or now >= t + self._owner_timeout

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
        pending = self._pending.get(peer)
        if not pending:
            return None
        asked, deliver, unasked = self._requested, self._deliver_timeout, self._unrequested_timeout
        return min(
            max(have, asked[i]) + deliver if i in asked else have + unasked for i, have in pending.items()
        )

    def _check_promises(self, peer: str, now: float) -> None:
        if peer in self._lapsed:
            return
        due = self._promise_due(peer)
        if due is not None and now >= due:
            self._lapsed[peer] = due

    def deadlines(self, pieces: Iterable[int]) -> list[float]:
        """When the owners of ``pieces`` go stale (their pieces become the mirror's)."""
        owners = {self.owner(i) for i in pieces}
        times = [t for t in (self.stale_at(o) for o in owners) if t is not None]
        if len(self._ranks) <= 2:
            return times  # no successor but this node
        return times + [t + self._owner_timeout for t in times]


@lru_cache(maxsize=4096)
def _ranks(peer: str, n: int) -> tuple[int, ...]:
    """Rendezvous weights of ``peer`` for pieces 0..n-1 (highest weight owns the piece); cached, as every fetch of a large swarm ranks the same ids."""
    key = peer.encode()
    return tuple(
        int.from_bytes(hashlib.blake2b(i.to_bytes(8, "big"), digest_size=8, key=key[:64]).digest(), "big")
        for i in range(n)
    )
