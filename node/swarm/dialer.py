"""Sessions by peer, and how they come to be: dialling, the simultaneous-dial tie-break,
backoff, warm sessions, reconnects and peer exchange.

One session per peer. When both ends dial at once, both keep the stream the
smaller peer id opened (:meth:`Dialer.register`). When both ends learn of
each other at once (an introduction, a lost session, a warm session), the
smaller peer id dials and the other only after ``intro_dial_delay`` if no
session came of it. An unreachable peer is not dialled again for a backoff
period; at most 8 dials run at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

import trio

from autoglm.node._p2p import ControlStream, P2PNode, PeerAddr
from autoglm.node.errors import AutoglmError
from autoglm.protocol._control import MAX_PEX_ADDRS, MAX_PEX_PEERS, PeerInfo, Peers
from autoglm.protocol._dialpolicy import DialBudget, allowed_addrs, multiaddr_host

from .config import SwarmConfig
from .session import Session

__all__ = ["Dialer"]

log = logging.getLogger("autoglm.node.swarm")

DIAL_BACKOFF = 5.0  # seconds before an unreachable peer is dialled again
WARM_BACKOFF = 60.0
INTRO_RETRY = 0.5  # seconds before introducing a peer whose addresses were not known yet  # ... and before a connected peer that refused a warm session is asked again


class Dialer:
    """The session registry and every dial. ``start(nursery)`` before dialling."""

    def __init__(
        self,
        p2p: P2PNode,
        config: SwarmConfig,
        new_session: Callable[[ControlStream, str], Session],
        drive: Callable[[Session], Awaitable[None]],
    ) -> None:
        self._p2p = p2p
        self._config = config
        self._new_session = new_session
        self._drive = drive
        self.sessions: dict[str, Session] = {}
        self._backoff: dict[str, float] = {}
        self._dialing: set[str] = set()  # peers being dialled after an introduction or a loss
        self._opening: dict[str, trio.Event] = {}  # control streams being opened, by peer
        self._limit = trio.CapacityLimiter(8)
        # Dials that introductions (Peers messages) queued: capped per introducer and in all.
        self.intro_budget = DialBudget(config.budget.intro_dials_per_peer, config.budget.intro_dials_total)
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- the registry ----------------------------------------------------------
    def register(self, s: Session) -> bool:
        """Make ``s`` the session with its peer; False if an existing one wins the tie-break."""
        old = self.sessions.get(s.peer_id)
        if old is not None:
            # Both sides dialled at once: both keep the stream the smaller peer id opened.
            if old.initiator <= s.initiator:
                return False
            old.cancel_scope.cancel()
        self.sessions[s.peer_id] = s
        if self._p2p is not None:
            self._p2p.protect(s.peer_id)
        return True

    def unregister(self, s: Session) -> bool:
        """Forget ``s`` if it is the registered session with its peer (True then)."""
        if self.sessions.get(s.peer_id) is not s:
            return False
        del self.sessions[s.peer_id]
        if self._p2p is not None:
            self._p2p.protect(s.peer_id, on=False)
        return True

    def holders(self, mid: bytes) -> list[str]:
        """Peers in session that hold (or are fetching) ``mid``."""
        return [p for p, s in self.sessions.items() if s.holds(mid)]

    def busy(self) -> bool:
        """A dial is under way to a peer not in session yet, or a session still waits for its Hello."""
        return any(p not in self.sessions for p in self._dialing) or any(not s.said_hello for s in self.sessions.values())

    # -- dialling --------------------------------------------------------------
    async def connect_peer(self, peer: PeerAddr | str) -> None:
        """Open a session with a peer unless one exists. SourceError if unreachable.

        One open per peer at a time: a second caller (a warm dial, a DHT
        lookup and an introduction can all name the same peer at once) waits
        for the first. Two streams from the same initiator would leave each
        end keeping whichever registered first there, not always the same
        one, and both sessions would die.
        """
        pid = peer.peer_id if isinstance(peer, PeerAddr) else peer
        if pid in self.sessions or pid == self._p2p.peer_id:
            return
        pending = self._opening.get(pid)
        if pending is not None:
            await pending.wait()
            return
        self._opening[pid] = done = trio.Event()
        try:
            stream = await self._p2p.open_control(peer)
            assert self._nursery is not None
            s = self._new_session(stream, self._p2p.peer_id)
            if self.register(s):  # registered before anyone else can look
                log.info("session with %s started", s.peer_id)
                self._nursery.start_soon(self._drive, s)
            else:
                await stream.aclose()
        finally:
            del self._opening[pid]
            done.set()

    def dial_later(
        self,
        peer: PeerAddr,
        why: str,
        after: float = 0.0,
        backoff: float = DIAL_BACKOFF,
        on_done: Callable[[str], None] | None = None,
    ) -> None:
        """Dial a peer we were told about (or lost) in the background.

        Both ends of an introduction (or of a lost session) learn of it at
        once: the smaller peer id dials, the other only if no session came
        of it within ``intro_dial_delay``.
        """
        assert self._nursery is not None
        self._dialing.add(peer.peer_id)
        delay = after + (0.0 if self._p2p.peer_id < peer.peer_id else self._config.intro_dial_delay)
        self._nursery.start_soon(self._dial_after, peer, why, delay, backoff, on_done)

    async def _dial_after(
        self, peer: PeerAddr, why: str, delay: float, backoff: float, on_done: Callable[[str], None] | None
    ) -> None:
        try:
            if delay:
                await trio.sleep(delay)
                if peer.peer_id in self.sessions:
                    return
            await self._try_dial(peer, why, backoff)
        finally:
            self._dialing.discard(peer.peer_id)
            if on_done is not None:
                on_done(peer.peer_id)

    async def _try_dial(self, peer: PeerAddr | str, why: str, backoff: float = DIAL_BACKOFF) -> None:
        """Open a session (at most 8 dials at once); an unreachable peer is not dialled again for ``backoff`` s."""
        pid = peer.peer_id if isinstance(peer, PeerAddr) else peer
        try:
            async with self._limit:
                await self.connect_peer(peer)
        except AutoglmError as exc:
            self._backoff[pid] = trio.current_time() + backoff
            log.info("peer %s (%s) unreachable: %s", pid, why, exc)

    async def dial_all(self, candidates: Sequence[PeerAddr | str]) -> None:
        """Dial every candidate not in session nor backing off, at once; returns when all are done."""
        now = trio.current_time()
        async with trio.open_nursery() as nursery:
            for peer in candidates:
                pid = peer.peer_id if isinstance(peer, PeerAddr) else peer
                if pid not in self.sessions and now >= self._backoff.get(pid, 0.0):
                    nursery.start_soon(self._try_dial, peer, "discovery")

    def reconnect(self, peer_id: str) -> None:
        """A holder of what we fetch dropped out (a reset connection, often a loaded host): dial it again.

        Within the membership grace period rather than waiting for the DHT; the
        smaller peer id goes first, as for introductions.
        """
        if self._nursery is None or self._p2p is None or peer_id in self._dialing:
            return
        info = self.peer_info(peer_id)
        if info is not None:
            self.dial_later(PeerAddr(peer_id, info.addrs), "reconnect", after=0.2)

    async def keep_warm(self) -> None:
        """Keep idle sessions with connected peers (``warm_sessions``), checked every ``warm_interval``.

        Peers libp2p is connected to come first (bootstrap, DHT traffic,
        inbound: a stream on an existing connection), then the rest of the DHT
        routing table, so a small fleet ends up fully meshed before anyone
        fetches. Both ends learn of each other at about the same time, so the
        smaller peer id dials and the other only if no session came of it.
        """
        while True:
            room = self._config.warm_sessions - len(self.sessions) - len(self._dialing)
            now = trio.current_time()
            candidates = [PeerAddr(p, ()) for p in self._p2p.connected_peers()] + self._p2p.routing_peers()
            for peer in candidates:
                if room <= 0:
                    break
                pid = peer.peer_id
                if pid == self._p2p.peer_id or pid in self.sessions or pid in self._dialing:
                    continue
                if now < self._backoff.get(pid, 0.0):
                    continue
                self.dial_later(peer, "warm session", backoff=WARM_BACKOFF)
                room -= 1
            await trio.sleep(self._config.warm_interval)

    # -- peer exchange ---------------------------------------------------------
    def peer_info(self, peer_id: str) -> PeerInfo | None:
        addrs = self._p2p.peer_addrs(peer_id, MAX_PEX_ADDRS)
        return PeerInfo(peer_id, addrs) if addrs else None

    async def _introduce_later(self, s: Session, mid: bytes) -> None:
        await trio.sleep(INTRO_RETRY)
        if not s.closed:
            self.introduce(s, mid, retry=True)

    def introduce(self, s: Session, mid: bytes, retry: bool = False) -> None:
        """``s`` said it holds or fetches ``mid``: introduce it and the other holders to each other.

        Every node dials its bootstrap peers first, so a bootstrap node acts
        as a tracker: nodes started together learn of each other within one
        round trip of their Hello, not after several DHT rounds (the first
        copy can only be spread among nodes that know each other).
        """
        others = [self.sessions[p] for p in self.holders(mid) if p != s.peer_id]
        if not others:
            return
        me = self.peer_info(s.peer_id)
        if me is None and not retry and self._nursery is not None:
            # A peer that dialled us: its listen addresses come with identify, just after its
            # Hello. Holders that cannot be dialled (behind NAT) only learn of it this way.
            self._nursery.start_soon(self._introduce_later, s, mid)
            return
        infos = []
        for o in others:
            if me is not None:
                o.post(Peers(mid, (me,)))
            info = self.peer_info(o.peer_id)
            if info is not None:
                infos.append(info)
        for i in range(0, len(infos), MAX_PEX_PEERS):
            s.post(Peers(mid, tuple(infos[i : i + MAX_PEX_PEERS])))

    def departed(self, s: Session) -> None:
        """``s`` ended: unless its peer is back within ``member_grace``, tell the other holders it left.

        A departure is a Peers entry with no address (nodes that do not know
        it find nothing to dial in it). Receivers drop the peer from the
        members they know by peer exchange only (node/swarm/fetches.py
        ``on_peers``), as a session's end drops it after the same grace.
        """
        if self._nursery is None or s.peer_id == getattr(self._p2p, "peer_id", None):
            return
        mids = list(s.manifests())
        if mids:
            try:
                self._nursery.start_soon(self._tell_departed, s.peer_id, mids)
            except RuntimeError:  # the node is stopping (its nursery closed): nobody left to tell
                pass

    async def _tell_departed(self, peer_id: str, mids: list[bytes]) -> None:
        await trio.sleep(self._config.member_grace)
        if peer_id in self.sessions:
            return  # back (a reset stream dialled again): not a departure
        gone = (PeerInfo(peer_id, ()),)
        for mid in mids:
            for p in self.holders(mid):
                self.sessions[p].post(Peers(mid, gone))

    def listen_hosts(self) -> list[str]:
        """The IPs this node listens on (the dial policy's reference: protocol/_dialpolicy.py)."""
        return [h for h in (multiaddr_host(a) for a in self._p2p.addrs()) if h is not None]

    def introduced(self, by: Session, peers: Iterable[PeerInfo]) -> None:
        """A peer introduced others (advice): dialled under the dial policy and budget; Noise checks every id.

        Only addresses :func:`~autoglm.protocol._dialpolicy.may_dial` allows
        (public, or in our own private network or loopback scope); each
        peer at most once per backoff period; at most ``intro_dials_per_peer``
        queued for one introducer and ``intro_dials_total`` in all, refilled at
        one a second after a burst of 64 (protocol/_dialpolicy.DialBudget).
        """
        if self._nursery is None:
            return
        now = trio.current_time()
        listen = self.listen_hosts()
        for info in peers:
            pid = info.peer_id
            if pid == self._p2p.peer_id or pid in self.sessions or pid in self._dialing or now < self._backoff.get(pid, 0.0):
                continue
            addrs = allowed_addrs(info.addrs, listen)
            if not addrs:
                log.debug("not dialling %s introduced by %s: no address we may dial", pid, by.peer_id)
                continue
            if not self.intro_budget.admit(by.peer_id, pid, now):
                log.debug("dial budget of %s spent: not dialling %s", by.peer_id, pid)
                continue
            self.dial_later(PeerAddr(pid, addrs), f"introduced by {by.peer_id}", on_done=self.intro_budget.done)
