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
when its owner has shown no progress (a Have) for ``owner_timeout``: slow
or stuck owners fall back to the source. So N nodes started together each
pull about 1/N of the model from the mirror and trade the rest.

*Claims* override the hash: a member that says it asked a mirror for a
piece (the swarm's ``Claim`` message) owns it from then on, so nodes that
started before they knew of each other do not both bring the same first
copy in. When both asked, the smaller id keeps it (on both sides). A claim
lasts while its peer is a member; at most ``MAX_PEER_CLAIMS`` are honoured
per peer, and only a Have counts as progress, so claims alone cannot keep
the mirror from a piece.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

__all__ = ["MAX_PEER_CLAIMS", "FirstCopy"]

MAX_PEER_CLAIMS = 64  # outstanding claims honoured per swarm peer
_SMALL_PIECE = 1 << 20  # pieces below this go first in a mirror's order


class FirstCopy:
    """Owners and claims of one manifest's pieces, as seen by node ``me``."""

    def __init__(self, me: str, sizes: Sequence[int], owner_timeout: float = 20.0) -> None:
        self.me = me
        self._n = n = len(sizes)
        self._owner_timeout = owner_timeout
        self._owner: list[str] = [me] * n
        self._seen: dict[str, float] = {}  # member -> time of its last sign of progress
        self._claimed: dict[int, str] = {}  # piece -> member that asked a mirror for it
        self._ranks: dict[str, list[int]] = {me: _ranks(me, n)}
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

    def set_members(self, peers: Iterable[str], now: float) -> bool:
        """The other nodes holding this manifest now; True when some piece changed owner.

        A newly seen member counts as making progress from ``now``.
        """
        members = set(peers) - {self.me}
        for p in members:
            if p not in self._ranks:
                self._ranks[p] = _ranks(p, self._n)
            self._seen.setdefault(p, now)
        for p in [p for p in self._ranks if p != self.me and p not in members]:
            del self._ranks[p]
            self._seen.pop(p, None)
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

    def piece_done(self, index: int) -> None:
        self._claimed.pop(index, None)

    def progress(self, peer: str, now: float) -> None:
        """A member showed progress (a Have): its pieces stay its own a while longer."""
        if peer in self._seen:
            self._seen[peer] = now

    def mirror_may_take(self, index: int, now: float) -> bool:
        """Whether a mirror may fetch ``index`` now (peer holdings aside): ours, or its owner is stale."""
        o = self.owner(index)
        if o == self.me:
            return True
        seen = self._seen.get(o)
        return seen is None or now - seen >= self._owner_timeout

    def deadlines(self, pieces: Iterable[int]) -> list[float]:
        """When the owners of ``pieces`` go stale (their pieces become the mirror's)."""
        owners = {self.owner(i) for i in pieces}
        return [self._seen[o] + self._owner_timeout for o in owners if o in self._seen]


def _ranks(peer: str, n: int) -> list[int]:
    """Rendezvous weights of ``peer`` for pieces 0..n-1 (highest weight owns the piece)."""
    key = peer.encode()
    return [
        int.from_bytes(hashlib.blake2b(i.to_bytes(8, "big"), digest_size=8, key=key[:64]).digest(), "big")
        for i in range(n)
    ]
