"""The swarm façade: start it, hold and fetch manifests through it, ask it for status.

Theory of operation
-------------------
One :class:`Swarm` runs per node. It owns the libp2p adapter (``_p2p``), the
peerwire server and the parts below, and routes every control message to
the part that handles it (:meth:`Swarm.on_message`):

* :class:`~.dialer.Dialer`: one :class:`~.session.Session` per peer, dials,
  the simultaneous-dial tie-break, backoff, warm sessions, reconnects, peer
  exchange;
* :class:`~.fetches.Fetches`: attached fetches, the :class:`~.session.PeerSource`
  each session gives them, bans, first-copy membership, claims;
* :class:`~.held.Held` and :class:`~.held.Serving`: what we hold and announce;
  tokens, grants and piece locations for the peerwire server;
* :class:`~.discovery.Discovery`: DHT lookups, the wait before a fetch, provider
  records, manifests by id;
* :class:`~.aliases.Aliases`: identical files under other manifests.

Downloading: a fetch registers with :meth:`Swarm.attach` (a
:class:`~.config.FetchHandle`, the engine's view). Pieces that the local node
verifies are announced to every session with Have.

Uploading: peers that say Interested compete for ``upload_slots``;
:func:`~autoglm.protocol._choking.choose_unchoked` keeps the least-served of
them unchoked, re-evaluated every ``rechoke_interval`` and on every change of
interest. Peerwire requests from a choked or banned peer are refused. Global
up and down rate limits apply to all peerwire traffic.

Failures: a peer whose piece fails the hash is banned for that manifest
(never asked again, never served again) and reported. A peer that rejects a
piece it advertised loses it from its bitfield at once, so the picker turns
to others within one request.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import trio

from autoglm.node._p2p import ControlStream, P2PNode, PeerAddr
from autoglm.node._peerwire import serve_peerwire
from autoglm.node._ratelimit import RateLimiter
from autoglm.node.errors import ProtocolError
from autoglm.protocol._choking import choose_unchoked
from autoglm.protocol._control import (
    Announce,
    Choke,
    Claim,
    ControlMessage,
    Endpoint,
    GetManifest,
    Have,
    Hello,
    Interested,
    KeyProof,
    ManifestData,
    NotInterested,
    Peers,
    Token,
    TokenRequest,
    Unchoke,
)

from .aliases import Aliases
from .config import FetchHandle, PieceStore, SwarmConfig, SwarmEvent, SwarmStats
from .dialer import Dialer
from .discovery import Discovery
from .fetches import Fetches
from .held import Held, Serving, tell, withdraw
from .reverse import PEERWIRE_STREAM_ID, REVERSE_PROTOCOL_ID, Reverse, may_be_unreachable
from .session import PeerSource, Session

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = ["Swarm", "advertised_host"]

log = logging.getLogger("autoglm.node.swarm")


class Swarm:
    """Serve, announce and fetch with peers. Start with ``await nursery.start(swarm.run)``."""

    def __init__(
        self,
        p2p: P2PNode,
        store: PieceStore,
        config: SwarmConfig | None = None,
        events: trio.MemorySendChannel[SwarmEvent] | None = None,
    ) -> None:
        self.p2p = p2p
        self._events = events
        self.config = config or SwarmConfig()
        self.stats = SwarmStats()
        self.up = RateLimiter(self.config.up_rate)
        self.down = RateLimiter(self.config.down_rate)
        self.endpoint: Endpoint | None = None
        self.dialer = Dialer(p2p, self.config, lambda stream, initiator: Session(self, stream, initiator), self._drive)
        self.sessions = self.dialer.sessions
        self.fetches = Fetches(self.sessions, self.config, self.stats, self._emit)
        self.held = Held(store)
        self.serving = Serving(
            self.held, store, self.stats, self.fetches.is_banned, self._unchoked, self.config.budget
        )
        self.discovery = Discovery(p2p, self.config, self.dialer, self.fetches, self.held, self._emit)
        self.aliases = Aliases(self.sessions, self.fetches, self.held.envelopes)
        self._nursery: trio.Nursery | None = None
        self._rechoke_now = trio.Event()
        self.paths = Reverse(p2p, self.config.peerwire_host, self.down, self.config.swarm_key,
                             lambda peer: peer in self.sessions, self.config.budget.peerwire_conns)

    # -- lifecycle ---------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[Swarm] = trio.TASK_STATUS_IGNORED) -> None:
        await self.held.load()
        async with trio.open_nursery() as nursery:
            self.use_nursery(nursery)
            host, port = await nursery.start(
                lambda task_status: serve_peerwire(
                    self.serving, self.serving.redeem, host=self.config.peerwire_host, port=self.config.peerwire_port,
                    up=self.up, psk=self.config.swarm_key, idle_timeout=self.config.budget.peerwire_idle,
                    inbound=self.paths.inbound, task_status=task_status,
                )
            )
            self.endpoint = Endpoint(advertised_host(host, self.p2p.addrs()), port)
            await nursery.start(self.paths.serve_rendezvous)
            self.p2p.set_stream_handler(REVERSE_PROTOCOL_ID, self.paths.on_request)
            self.p2p.set_stream_handler(PEERWIRE_STREAM_ID, self.paths.on_stream)
            self.p2p.set_control_handler(self.serve_session)
            nursery.start_soon(self._rechoker)
            nursery.start_soon(self.discovery.run_discoverer)
            nursery.start_soon(self.discovery.run_provider)
            if self.config.warm_sessions > 0:
                nursery.start_soon(self.dialer.keep_warm)
            task_status.started(self)

    def use_nursery(self, nursery: trio.Nursery) -> None:
        """Where dials, reconnects and delayed work run (``run`` passes its own; embedders and tests theirs)."""
        self._nursery = nursery
        self.dialer.start(nursery)
        self.fetches.nursery = nursery

    # -- what we hold ------------------------------------------------------------
    def start_holding(self, manifest_id: bytes, piece_count: int, have: Iterable[int] = (), envelope: bytes | None = None) -> None:
        """Start holding a manifest (a fetch began): announce it to peers and the DHT.

        ``envelope`` (the signed manifest) is what peers get when they ask for it by id.
        """
        if self.held.start_holding(manifest_id, piece_count, have, envelope):
            state = self.held.state(manifest_id)
            for s in list(self.sessions.values()):
                s.announced.add(manifest_id)
                s.post(Announce(state))

    def piece_verified(self, manifest_id: bytes, index: int) -> None:
        """A piece is durable and verified here: tell every peer."""
        if self.held.add_piece(manifest_id, index):
            tell(self.sessions.values(), manifest_id, Have(manifest_id, index))

    async def refresh_held(self, mid: bytes) -> None:
        """Re-read a manifest's verified pieces from the store."""
        await self.held.refresh(mid)

    async def withdraw(self, mid: bytes) -> None:
        """Pieces of ``mid`` were removed here: tell peers what is left (see :func:`.held.withdraw`)."""
        await withdraw(self.held, self.sessions, mid, self._unprovide)

    def _unprovide(self, mid: bytes) -> None:
        self.discovery.forget(mid)
        self.p2p.unprovide_manifest(mid)

    # -- fetching ------------------------------------------------------------------
    def attach(self, manifest_id: bytes, fetch: FetchHandle) -> None:
        """Make peers that hold ``manifest_id`` sources of ``fetch`` (now and as they appear)."""
        self.fetches.attach(manifest_id, fetch)
        for s in list(self.sessions.values()):
            self.aliases.probe(s)
        if self._nursery is not None:
            self._nursery.start_soon(self.discovery.discover_files, manifest_id)
        self.discovery.wanted_changed()

    def detach(self, manifest_id: bytes) -> None:
        self.fetches.detach(manifest_id)

    def fetching(self, manifest_id: bytes) -> bool:
        return manifest_id in self.fetches

    def post_claims(self, manifest_id: bytes, indices: Sequence[int]) -> None:
        """This node just asked a mirror for these pieces: the peers fetching the manifest leave them to it."""
        self.fetches.post_claims(manifest_id, indices)

    def holders(self, mid: bytes) -> list[str]:
        """Peers in session that hold (or are fetching) ``mid``."""
        return self.dialer.holders(mid)

    async def discover_first(self, mid: bytes) -> None:
        """Before a fetch starts: find the peers holding ``mid`` (see Discovery.discover_first)."""
        await self.discovery.discover_first(mid)

    async def fetch_manifest(self, manifest_id: bytes) -> bytes:
        """The signed envelope of ``manifest_id`` from any peer that holds it (callers bound the wait)."""
        return await self.discovery.fetch_manifest(manifest_id)

    async def connect_peer(self, peer: PeerAddr | str) -> None:
        """Open a session with a peer unless one exists. SourceError if unreachable."""
        await self.dialer.connect_peer(peer)

    # -- SessionHost -----------------------------------------------------------------
    def is_banned(self, peer_id: str, manifest_id: bytes) -> bool:
        return self.fetches.is_banned(peer_id, manifest_id)

    def ban(self, peer_id: str, manifest_id: bytes, why: str) -> None:
        """Never use nor serve ``peer_id`` for ``manifest_id`` again (this process)."""
        self.fetches.ban(peer_id, manifest_id, why)

    def broken_promise(self, peer_id: str, manifest_id: bytes, why: str) -> None:
        """``peer_id`` refused or stalled on a piece it advertised: repeated, a ban for ``promise_ban``."""
        self.fetches.broken_promise(peer_id, manifest_id, why)

    def availability_changed(self, source: PeerSource) -> None:
        self.fetches.availability_changed(source)

    def _unchoked(self, peer_id: str) -> bool:
        s = self.sessions.get(peer_id)
        return s is not None and s.unchoking

    # -- sessions ----------------------------------------------------------------------
    async def serve_session(self, stream: ControlStream) -> None:
        """Run a session on a control stream the peer opened, until it ends."""
        s = Session(self, stream, stream.peer_id)
        if not self.dialer.register(s):
            await stream.aclose()
            return
        log.info("session with %s started", s.peer_id)
        await self._drive(s)

    async def _drive(self, s: Session) -> None:
        try:
            with s.cancel_scope:
                if s.key_proof is not None:
                    s.post(s.key_proof)  # Hello only once the peer proved the key too (on_message)
                else:
                    self._greet(s)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(s.writer)
                    await s.reader()
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError) as eg:
            log.info("session with %s ended: %s", s.peer_id, eg.exceptions[0])
        except* Exception:  # the per-peer supervisor: one peer's bug must not stop the node
            log.exception("session with %s failed", s.peer_id)
        finally:
            with trio.CancelScope(shield=True):
                await self._end_session(s)

    async def _end_session(self, s: Session) -> None:
        if self.dialer.unregister(s):
            self.serving.forget_peer(s.peer_id)
        s.closed = True
        self.dialer.departed(s)
        if self.fetches.session_ended(s):
            self.dialer.reconnect(s.peer_id)
        self._rechoke_now.set()
        self.discovery.peers_changed()
        await s.aclose()

    def _greet(self, s: Session) -> None:
        """Hello carries what fits in one frame; the rest follows as Announce."""
        first, rest = self.held.hello_states()
        s.post(Hello(tuple(first), self.endpoint, self.serving.issue_token(s.peer_id)))
        for st in rest:
            s.post(Announce(st))
        s.announced.update(st.manifest_id for st in [*first, *rest])

    @property
    def local_peer_id(self) -> str:
        return "" if self.p2p is None else self.p2p.peer_id

    # -- messages ----------------------------------------------------------------------
    def on_message(self, s: Session, msg: ControlMessage) -> None:
        """Route one message from ``s`` to the part that handles it."""
        match msg:
            case KeyProof():  # the peer holds the swarm key (ControlConnection checked it)
                self._greet(s)
            case Hello() | Announce():
                self.discovery.peers_changed()
                for st in msg.manifests if isinstance(msg, Hello) else (msg.state,):
                    self._on_state(s, st.manifest_id)
                self.aliases.probe(s)
            case Peers():
                # Advice: dialled only while fetching that manifest, or holding it from
                # where others may not reach us (behind NAT: node/swarm/reverse.py).
                mid = msg.manifest_id
                if mid in self.fetches or (mid in self.held and may_be_unreachable(self.dialer.listen_hosts())):
                    self.dialer.introduced(s, msg.peers)
                self.fetches.on_peers(s.peer_id, mid, msg.peers)  # first-copy members known by peer exchange
            case Claim():
                if not s.within_rate("Claim"):
                    return
                fetch = self.fetches.get(msg.manifest_id)
                if fetch is not None and not self.is_banned(s.peer_id, msg.manifest_id):
                    fetch.peer_claims(s.peer_id, msg.indices)
            case Have():
                if s.within_rate("Have"):
                    self.fetches.on_have(s, msg.manifest_id, msg.index)
            case Interested() | NotInterested():
                if s.within_rate("Interested"):
                    self._rechoke_now.set()
                    # A peer with nothing of the manifest is a first-copy member only while it fetches it.
                    self.fetches.update_membership(msg.manifest_id)
                    self.discovery.peers_changed()
            case TokenRequest():
                if s.within_rate("TokenRequest"):
                    s.post(Token(self.serving.issue_token(s.peer_id)))
            case GetManifest():
                s.serve_manifest(msg, self.held.envelopes.get(msg.manifest_id, b""))
            case ManifestData():
                self.aliases.on_manifest_data(msg)
                self.discovery.on_manifest_data(s, msg)
            case Token():
                s.on_token()
            case Unchoke():
                for src in s.all_sources():
                    self.fetches.use(s, src)
            case Choke():
                for src in s.all_sources():
                    self.fetches.stop_using(src)
            case _:
                pass

    def _on_state(self, s: Session, mid: bytes) -> None:
        """``s`` announced ``mid`` (Hello or Announce): a source and a member; introductions once."""
        self.fetches.on_announce(s, mid)
        if mid not in s.introduced:
            s.introduced.add(mid)
            self.dialer.introduce(s, mid)
            fetch = self.fetches.get(mid)
            if fetch is not None:  # a new member hears what we already asked a mirror for
                self.fetches.post_claims(mid, fetch.mirror_claims(), only=s)

    # -- choking -----------------------------------------------------------------------
    def rechoke(self) -> None:
        interested = [p for p, s in self.sessions.items() if s.interested]
        keep = choose_unchoked(interested, self.serving.served, self.config.upload_slots)
        for p, s in self.sessions.items():
            s.set_unchoked(p in keep)

    async def _rechoker(self) -> None:
        while True:
            self.rechoke()
            with trio.move_on_after(self.config.rechoke_interval):
                await self._rechoke_now.wait()
            self._rechoke_now = trio.Event()

    # -- reporting -----------------------------------------------------------------------
    def _emit(self, ev: SwarmEvent) -> None:
        """Report to whoever consumes the swarm's events (the CLI); never blocks the swarm."""
        if self._events is None:
            return
        try:
            self._events.send_nowait(ev)
        except trio.WouldBlock:
            log.debug("swarm event dropped: %r", ev)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._events = None

    def status(self) -> dict[str, object]:
        """A JSON-ready snapshot for `autoglm-node status`."""
        return swarm_status(self)


def swarm_status(sw: Swarm) -> dict[str, object]:
    """Swarm.status: peers, held manifests, transfer counters, peerwire paths and relay state."""
    return {
        "peer_id": sw.p2p.peer_id,
        "addrs": sw.p2p.addrs(),
        "peerwire": None if sw.endpoint is None else f"{sw.endpoint.host}:{sw.endpoint.port}",
        "dht_size": sw.p2p.dht_size(),
        "peers": [
            {
                "peer_id": p,
                "unchoked_by_us": s.unchoking,
                "unchoking_us": s.unchoking_us,
                "manifests": {m.hex(): len(bf) for m, bf in s.manifests().items()},
                "served_bytes": sw.serving.served.get(p, 0),
            }
            for p, s in sw.sessions.items()
        ],
        "held": sw.held.status(),
        "up_bytes": sw.stats.up_bytes,
        "down_bytes": sw.stats.down_bytes,
        "banned": [list(b) for b in sw.stats.banned],
        "lost_pieces": sw.stats.lost_pieces,
        "peerwire_paths": sw.paths.stats.as_dict(),
        "relay": sw.p2p.relay_status() if sw.p2p is not None else {},  # docs/nat.md
    }


def advertised_host(bound: str, listen: Iterable[str]) -> str:
    """The peerwire host a Hello names: what the server is reachable at, never a wildcard.

    The bound host when it is concrete; for a wildcard bind (``--peerwire
    0.0.0.0:P``), the first concrete host of the same family among the libp2p
    listen multiaddrs (the address peers reached this node's sessions at),
    else the loopback of that family. Peers reach the bulk channel at the
    session's remote address and read only the port (docs/security.md), so
    this is what status shows and what a Hello says, consistent with a
    listener that advertises only what it binds.
    """
    try:
        ip = ipaddress.ip_address(bound)
    except ValueError:
        return bound  # a name: what the operator gave
    if not ip.is_unspecified:
        return bound
    proto = "ip4" if ip.version == 4 else "ip6"
    for maddr in listen:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] == proto:
            try:
                cand = ipaddress.ip_address(parts[2])
            except ValueError:
                continue
            if not cand.is_unspecified:
                return str(cand)
    return "127.0.0.1" if ip.version == 4 else "::1"
