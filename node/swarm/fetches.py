"""The fetches attached to the swarm, the peer sources they use, bans, first-copy membership, claims.

A fetch registers with :meth:`Fetches.attach`. For every session whose peer
holds that manifest, a :class:`PeerSource` joins the fetch while the peer
unchokes us, and the peer's Have messages reach the fetch as availability.
Peers that hold or fetch the manifest are the fetch's first-copy membership
(protocol/_membership.py); the pieces a fetch asks a mirror for go to them
as Claim messages. Holders that peer exchange names (Peers messages) and that
are not in session here are *relayed* members (protocol/_ownership.py), so
nodes with different sessions rank the same swarm; a Peers entry with no
address says that peer left (its introducer's session with it ended and
did not come back within ``member_grace``: node/swarm/dialer.py
``departed``), and it stops being a member. At most ``MAX_RELAYED`` per
manifest (``MAX_RELAYED_PER_PEER`` named by one peer), applied at most
every ``GOSSIP_SETTLE`` seconds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import trio

from autoglm.protocol._control import MAX_CLAIM, Claim, Interested, NotInterested, PeerInfo
from autoglm.protocol._membership import membership

from .budget import PromiseLedger
from .config import FetchHandle, PeerBanned, SwarmConfig, SwarmEvent, SwarmStats
from .session import PeerSource, Session

__all__ = ["MAX_RELAYED", "Fetches", "is_idle"]

MAX_RELAYED = 4096  # peers known by peer exchange only, per manifest (each one is a first-copy member)
MAX_RELAYED_PER_PEER = 2048  # ... of which one peer in session may have named
# Peer exchange changes the members at most this often (each change re-ranks every piece over every member).
GOSSIP_SETTLE = 1.0

log = logging.getLogger("autoglm.node.swarm")


class Fetches:
    """Running fetches by manifest id, and what the swarm feeds them."""

    def __init__(
        self,
        sessions: Mapping[str, Session],
        config: SwarmConfig,
        stats: SwarmStats,
        emit: Callable[[SwarmEvent], None],
    ) -> None:
        self._sessions = sessions
        self._config = config
        self._stats = stats
        self._emit = emit
        self._fetches: dict[bytes, FetchHandle] = {}
        self.attached_at: dict[bytes, float] = {}
        # manifest -> peer -> banned until (inf: for good, a piece that failed its hash)
        self._banned: dict[bytes, dict[str, float]] = {}
        budget = config.budget
        self._promises = PromiseLedger(budget.broken_promises, budget.broken_promise_window)
        # manifest -> peer -> (when its session ended, whether it was complete): see member_grace
        self._departed: dict[bytes, dict[str, tuple[float, bool]]] = {}
        # manifest -> holder named by peer exchange -> the peer that named it, until a departure names it
        self._gossiped: dict[bytes, dict[str, str]] = {}
        # manifest -> holder of nothing not (yet) Interested -> since when: a member for its first round
        self._idle_since: dict[bytes, dict[str, float]] = {}
        # membership updates that are due later: a grace or a first round ends, peer exchange settles
        self._later = Later(self.update_membership)

    @property
    def nursery(self) -> trio.Nursery | None:
        return self._later.nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery | None) -> None:
        self._later.nursery = nursery

    # -- queries ---------------------------------------------------------------
    def get(self, manifest_id: bytes) -> FetchHandle | None:
        return self._fetches.get(manifest_id)

    def ids(self) -> list[bytes]:
        return list(self._fetches)

    def items(self) -> list[tuple[bytes, FetchHandle]]:
        return list(self._fetches.items())

    def __contains__(self, manifest_id: object) -> bool:
        return manifest_id in self._fetches

    def __bool__(self) -> bool:
        return bool(self._fetches)

    def is_banned(self, peer_id: str, manifest_id: bytes) -> bool:
        until = self._banned.get(manifest_id, {}).get(peer_id)
        return until is not None and trio.current_time() < until

    def _banned_now(self, manifest_id: bytes) -> set[str]:
        now = trio.current_time()
        return {p for p, until in self._banned.get(manifest_id, {}).items() if now < until}

    def live(self, src: PeerSource | None) -> FetchHandle | None:
        """The fetch ``src`` is a source of, if it is attached to it now."""
        return None if src is None or not src.attached else self._fetches.get(src.manifest_id)

    # -- attach / detach -------------------------------------------------------
    def attach(self, manifest_id: bytes, fetch: FetchHandle) -> None:
        self._fetches[manifest_id] = fetch
        self.attached_at[manifest_id] = trio.current_time()
        for s in list(self._sessions.values()):
            self.offer(s, manifest_id)
        self.update_membership(manifest_id)

    def detach(self, manifest_id: bytes) -> None:
        self._fetches.pop(manifest_id, None)
        self._gossiped.pop(manifest_id, None)
        self._idle_since.pop(manifest_id, None)
        self.attached_at.pop(manifest_id, None)
        self._later.cancel(manifest_id)
        for s in list(self._sessions.values()):
            src = s.sources.pop(manifest_id, None)
            if src is not None:
                src.attached = False
                s.post(NotInterested(manifest_id))
            for alias in s.drop_aliases(manifest_id):
                alias.attached = False
                s.post(NotInterested(alias.held_as))

    def offer(self, s: Session, mid: bytes) -> None:
        """``s`` may hold ``mid``: make it a source of that fetch (Interested, then in use once it unchokes us)."""
        if mid not in self._fetches or mid in s.sources or s.bitfield(mid) is None or self.is_banned(s.peer_id, mid):
            return
        src = s.sources[mid] = PeerSource(s, mid)
        log.info("peer %s holds %s", s.peer_id, mid.hex()[:16])
        s.post(Interested(mid))
        self.use(s, src)

    def offer_alias(self, s: Session, mid: bytes, held_as: bytes, mapping: dict[int, int]) -> None:
        """``s`` holds pieces of the fetch of ``mid`` under its manifest ``held_as`` (identical files)."""
        src = s.aliases[held_as] = PeerSource(s, mid, (held_as, mapping))
        log.info("peer %s holds %d pieces of %s as %s", s.peer_id, len(mapping), mid.hex()[:16], held_as.hex()[:16])
        s.post(Interested(held_as))
        self.use(s, src)

    def use(self, s: Session, src: PeerSource) -> None:
        """Add ``src`` to its fetch while its peer unchokes us."""
        fetch = self._fetches.get(src.manifest_id)
        if fetch is None or src.attached or not s.unchoking_us or self.is_banned(s.peer_id, src.manifest_id):
            return
        src.attached = True
        fetch.add_source(src)

    def stop_using(self, src: PeerSource) -> None:
        fetch = self._fetches.get(src.manifest_id)
        if src.attached and fetch is not None:
            fetch.remove_source(src.id)
        src.attached = False

    def availability_changed(self, src: PeerSource) -> None:
        """``src``'s peer changed what it says it has (a re-announce, a lost piece)."""
        fetch = self.live(src)
        if fetch is not None:
            fetch.source_bitfield(src.id, src.availability() or ())

    # -- what peers say ------------------------------------------------------------
    def on_announce(self, s: Session, mid: bytes) -> None:
        """``s`` announced ``mid`` (Hello or Announce): offer it as a source, or replace its bitfield."""
        src = s.sources.get(mid)
        fetch = self._fetches.get(mid)
        if src is None:
            self.offer(s, mid)
        elif src.attached and fetch is not None:  # a re-announce replaces the bitfield
            fetch.source_bitfield(src.id, s.bitfield(mid) or ())
        self.update_membership(mid)
        alias = s.aliases.get(mid)
        if alias is not None:
            self.availability_changed(alias)

    def on_have(self, s: Session, mid: bytes, index: int) -> None:
        """``s`` has one more piece of ``mid`` (its own, or ours under an alias)."""
        src = s.sources.get(mid)
        fetch = self._fetches.get(mid)
        if fetch is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("have %d from %s", index, s.peer_id[-6:])
        if src is not None and src.attached and fetch is not None:
            fetch.source_have(src.id, index)
        alias = s.aliases.get(mid)
        alias_fetch = self.live(alias)
        if alias is not None and alias_fetch is not None:
            for i in alias.ours(index):
                alias_fetch.source_have(alias.id, i)
        bf = s.bitfield(mid)
        if fetch is not None and bf is not None:
            if not bf.complete:
                fetch.peer_progress(s.peer_id, index)
            else:
                # Complete now, or claimed complete from the start: a Have from a
                # peer that already "had" everything is no progress (a liar goes stale).
                self.update_membership(mid)

    def on_peers(self, by: str, mid: bytes, peers: Sequence[PeerInfo]) -> None:
        """Peer ``by`` named holders of ``mid`` (with addresses) or departures (without): relayed members.

        Applied at most every ``GOSSIP_SETTLE`` seconds per manifest (a swarm
        of a thousand nodes joining must not re-rank the pieces a thousand times).
        """
        if mid not in self._fetches:
            return
        known = self._gossiped.setdefault(mid, {})
        named = sum(1 for v in known.values() if v == by)
        changed = False
        for info in peers:
            if not info.addrs:
                if info.peer_id in known:
                    del known[info.peer_id]
                    changed = True
            elif info.peer_id not in known and len(known) < MAX_RELAYED and named < MAX_RELAYED_PER_PEER:
                known[info.peer_id] = by
                named += 1
                changed = True
        if changed and not self._later.at(mid, trio.current_time() + GOSSIP_SETTLE):
            self.update_membership(mid)

    # -- bans ------------------------------------------------------------------
    def ban(self, peer_id: str, manifest_id: bytes, why: str, duration: float | None = None) -> None:
        """Neither use nor serve ``peer_id`` for ``manifest_id``: for ``duration`` seconds, or for good (None)."""
        now = trio.current_time()
        until = math.inf if duration is None else now + duration
        banned = self._banned.setdefault(manifest_id, {})
        if banned.get(peer_id, -math.inf) >= until:
            return
        was = self.is_banned(peer_id, manifest_id)
        banned[peer_id] = until
        if duration is None:
            self._stats.bad_pieces += 1
        elif self.nursery is not None:
            self.nursery.start_soon(self._unban_at, peer_id, manifest_id, until)
        if was:
            return
        self._stats.banned.append((peer_id, manifest_id.hex()))
        log.warning("banned peer %s for manifest %s: %s", peer_id, manifest_id.hex()[:16], why)
        self._emit(PeerBanned(peer_id, manifest_id, why))
        s = self._sessions.get(peer_id)
        if s is not None:
            fetch = self._fetches.get(manifest_id)
            for src in [s.sources.pop(manifest_id, None), *s.drop_aliases(manifest_id)]:
                if src is not None and src.attached and fetch is not None and self.nursery is not None:
                    # Removed from the next task step, so the engine first records
                    # the failure and reports it (SourceFailed, integrity=True).
                    self.nursery.start_soon(_remove_source, fetch, src.id)
        self.update_membership(manifest_id)

    def broken_promise(self, peer_id: str, manifest_id: bytes, why: str) -> None:
        """A request for a piece ``peer_id`` advertised ended unserved; ``broken_promises`` in the window: a timed ban."""
        budget = self._config.budget
        if self._promises.broken(peer_id, manifest_id, trio.current_time()):
            self.ban(peer_id, manifest_id, f"{budget.broken_promises} broken promises in "
                     f"{budget.broken_promise_window:.0f} s (last: {why})", duration=budget.promise_ban)

    async def _unban_at(self, peer_id: str, manifest_id: bytes, until: float) -> None:
        await trio.sleep_until(until)
        banned = self._banned.get(manifest_id, {})
        if banned.get(peer_id) != until:
            return  # banned again since, or for good
        del banned[peer_id]
        log.info("ban of peer %s for manifest %s is over", peer_id, manifest_id.hex()[:16])
        s = self._sessions.get(peer_id)
        if s is not None:
            self.offer(s, manifest_id)
        self.update_membership(manifest_id)

    # -- membership and claims ---------------------------------------------------
    def update_membership(self, mid: bytes) -> None:
        """Tell the fetch of ``mid`` which peers hold it too: fetching peers share the first copy."""
        fetch = self._fetches.get(mid)
        if fetch is None:
            return
        holders = []
        for p, s in self._sessions.items():
            bf = s.bitfield(mid)
            if bf is not None and not s.closed:
                holders.append((p, bf.complete))
        now = trio.current_time()
        was = self._idle_since.get(mid, {})  # since we know it announced nothing (or since the fetch began)
        idle = self._idle_since[mid] = {p: was.get(p, now) for p, s in self._sessions.items() if is_idle(s, mid)}
        m = membership(
            holders, self._departed.get(mid, {}), banned=self._banned_now(mid), now=now,
            grace=self._config.member_grace, idle=idle, first_round=self._config.first_round,
        )
        if log.isEnabledFor(logging.DEBUG) and (late := [p for p in was if p not in idle and p in m.peers]):
            log.debug("%s: %s fetch it too, %s s after they announced it", mid.hex()[:16],
                      ",".join(p[-6:] for p in late), ",".join(f"{now - was[p]:.3f}" for p in late))
        self._departed[mid] = m.departed
        self._later.at(mid, m.next_change)
        banned = self._banned_now(mid)
        # A gossiped peer in session counts directly once its Hello said what it holds; until then, relayed.
        told = {p for p, s in self._sessions.items() if s.said_hello}
        relayed = [p for p in self._gossiped.get(mid, ()) if p not in told and p not in m.departed and p not in banned]
        # A departed member is relayed while its grace lasts: its pieces still reach us through others, and
        # the first Have of one of them from anyone is its progress (protocol/_ownership.py, relayed members).
        gone = m.departed
        fetch.set_swarm([p for p in m.peers if p not in gone], [p for p in m.complete if p not in gone], [*relayed, *gone])

    def session_ended(self, s: Session) -> bool:
        """``s`` is gone: stop using it; holders of what we fetch stay members for the grace period.

        True when it held something we fetch (dial it again).
        """
        for src in s.all_sources():
            self.stop_using(src)
        s.sources.clear()
        s.aliases.clear()
        now = trio.current_time()
        redial = False
        again = self._sessions.get(s.peer_id)  # a session that replaced this one (both dialled at once)
        for mid, bf in s.manifests().items():
            if mid in self._fetches and not is_idle(s, mid) and (again is None or again.bitfield(mid) is None):
                redial = redial or again is None
                self._departed.setdefault(mid, {})[s.peer_id] = (now, bf.complete)
        for mid in list(self._fetches):
            self.update_membership(mid)
        return redial

    def post_claims(self, mid: bytes, indices: Sequence[int], only: Session | None = None) -> None:
        """Tell the peers fetching ``mid`` which pieces we just asked a mirror for (see FirstCopy.peer_claims)."""
        if not indices:
            return
        for s in [only] if only is not None else list(self._sessions.values()):
            bf = s.bitfield(mid)
            if bf is None or bf.complete or mid not in s.announced or s.closed:
                continue
            for k in range(0, len(indices), MAX_CLAIM):
                s.post(Claim(mid, tuple(indices[k : k + MAX_CLAIM])))


class Later:
    """At most one pending call of ``call(mid)`` per manifest, at the earliest time asked for."""

    def __init__(self, call: Callable[[bytes], None]) -> None:
        self._call = call
        self._due: dict[bytes, float] = {}  # manifest -> when its call is due (a task sleeps until then)
        self.nursery: trio.Nursery | None = None

    def at(self, mid: bytes, t: float) -> bool:
        """Call for ``mid`` at ``t`` (or earlier, if already due earlier); False: no nursery to wait in."""
        if self.nursery is None:
            return False
        if t == math.inf or self._due.get(mid, math.inf) <= t:
            return True
        try:
            self.nursery.start_soon(self._then, mid, t)
        except RuntimeError:  # the node is stopping (its nursery closed): nothing to update any more
            return True
        self._due[mid] = t
        return True

    def cancel(self, mid: bytes) -> None:
        self._due.pop(mid, None)

    async def _then(self, mid: bytes, t: float) -> None:
        await trio.sleep_until(t)
        if self._due.get(mid) == t:
            del self._due[mid]
            self._call(mid)


def is_idle(s: Session, mid: bytes) -> bool:
    """``s`` announced ``mid`` but holds none of it and is not fetching it (never said Interested).

    Such a peer (the publisher's node keeping a new version's envelope) is
    no first-copy member (protocol/_membership.py).
    """
    bf = s.bitfield(mid)
    return bf is not None and len(bf) == 0 and mid not in s.conn.theirs.interested


async def _remove_source(fetch: FetchHandle, source_id: str) -> None:
    fetch.remove_source(source_id)
