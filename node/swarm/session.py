"""One peer session, and that peer as a source of pieces.

A :class:`Session` is one control stream (``/autoglm/swarm/1``) driven by the
sans-IO :class:`ControlConnection` in a pump loop (:meth:`Session.reader`,
:meth:`Session.writer`), its outbox, and at most one peerwire client
connection to the peer, opened on first use with the one-time token from the
peer's Hello (a fresh one comes from TokenRequest/Token after a break).
What the peer told us is read through public queries (:meth:`Session.holds`,
:meth:`Session.bitfield`, :attr:`Session.unchoking_us`, ...).

A :class:`PeerSource` is the peer as a source of one manifest's pieces (the
Source interface of node/_sources.py), possibly an *alias*: the peer holds
identical pieces under another manifest.

Both reach the rest of the swarm only through :class:`SessionHost`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Protocol

import trio

from autoglm.node._p2p import ControlStream
from autoglm.node._peerwire import PeerRejected, PeerStalled, PeerwireConnection
from autoglm.node._ratelimit import RateLimiter
from autoglm.node._sources import FetchRequest, PieceSink, SourceKind
from autoglm.node.errors import IntegrityError, SourceError
from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._control import (
    Choke,
    Close,
    ControlConnection,
    ControlMessage,
    GetManifest,
    KeyProof,
    ManifestData,
    Phase,
    TokenRequest,
    Unchoke,
    decode_control,
    swarm_key_proof,
)
from autoglm.protocol._frames import NeedData
from autoglm.protocol._peerwire import RejectReason

from .budget import TokenBucket
from .config import SwarmConfig, SwarmStats
from .reverse import Reverse

__all__ = ["PeerSource", "Session", "SessionHost"]

log = logging.getLogger("autoglm.node.swarm")

_COALESCE_MAX = 256  # queued control messages joined into one write
_COALESCE_BYTES = 1 << 20  # ... and at most about this many bytes of them
_DECODE_INLINE = 64 * 1024  # control frames larger than this are decoded in a worker thread
_DECODE_THREADS = 2
_DECODE_LIMIT = trio.CapacityLimiter(_DECODE_THREADS)


class SessionHost(Protocol):
    """What a session and its sources need from the swarm."""

    @property
    def config(self) -> SwarmConfig: ...

    @property
    def stats(self) -> SwarmStats: ...

    @property
    def down(self) -> RateLimiter: ...

    @property
    def paths(self) -> Reverse:
        """Peerwire dialling: direct, else reverse-dialled (a peer behind NAT; node/swarm/reverse.py)."""
        ...

    @property
    def local_peer_id(self) -> str:
        """This node's own peer id (what the peer's swarm-key proof is bound to)."""
        ...

    def is_banned(self, peer_id: str, manifest_id: bytes) -> bool: ...

    def ban(self, peer_id: str, manifest_id: bytes, why: str) -> None: ...

    def broken_promise(self, peer_id: str, manifest_id: bytes, why: str) -> None:
        """The peer refused or stalled on a piece it advertised (repeated: a timed ban)."""
        ...

    def availability_changed(self, source: PeerSource) -> None:
        """``source`` lost a piece it advertised: its fetch must see its new availability."""
        ...

    def on_message(self, session: Session, msg: ControlMessage) -> None: ...


class PeerSource:
    """One peer as a source of one manifest's pieces (the Source protocol of node/_sources.py)."""

    #: Keep about this many seconds of this peer's measured throughput in flight.
    QUEUE_TIME = 1.0
    MIN_DEPTH, MAX_DEPTH = 2, 32

    def __init__(self, session: Session, manifest_id: bytes, alias: tuple[bytes, dict[int, int]] | None = None) -> None:
        self._session = session
        self.manifest_id = manifest_id
        # An alias: the peer holds these pieces under another manifest (an
        # identical file in another model or version): (its manifest id,
        # our piece index -> its piece index). Every byte is still checked
        # against our manifest's hash.
        self.alias = alias
        self.held_as = manifest_id if alias is None else alias[0]
        self._ours: dict[int, list[int]] = {}  # their piece index -> ours (an alias)
        for i, j in (alias[1] if alias is not None else {}).items():
            self._ours.setdefault(j, []).append(i)
        self._ready_at = 0.0
        self.bytes_received = 0
        # In the fetch only while the peer unchokes us: a peer that holds pieces
        # but never serves them must not keep the mirror from fetching them.
        self.attached = False
        self._rate = 0.0  # bytes/s, EWMA over piece inter-arrival times
        self._last: float | None = None
        self._piece_len = 0
        # Fixed for the source's life; the scheduler reads it for every source on every wake-up.
        self.id = f"peer:{session.peer_id}" + ("" if alias is None else f"@{alias[0].hex()[:8]}")

    def measure(self, nbytes: int, now: float) -> None:
        """A piece of ``nbytes`` arrived at ``now``: update the throughput estimate."""
        if self._last is not None:
            inst = nbytes / max(now - self._last, 1e-3)
            self._rate = inst if self._rate == 0.0 else 0.8 * self._rate + 0.2 * inst
        self._last = now
        self._piece_len = nbytes

    def pipeline_depth(self) -> int:
        """Requests to keep in flight: QUEUE_TIME seconds of measured throughput (libtorrent's rule)."""
        if self._rate == 0.0 or not self._piece_len:
            return self._session.host.config.pipeline
        depth = int(self._rate * self.QUEUE_TIME / self._piece_len) + 1
        return max(self.MIN_DEPTH, min(self.MAX_DEPTH, depth))

    @property
    def peer_id(self) -> str:
        return self._session.peer_id

    kind = SourceKind.PEER

    def availability(self) -> Collection[int] | None:
        bf = self._session.bitfield(self.held_as)
        if bf is None:
            return set()
        if self.alias is not None:
            return {i for i, j in self.alias[1].items() if j in bf}
        return set(bf)

    def ours(self, their_index: int) -> list[int]:
        """Our piece indices that the peer's piece ``their_index`` (of ``held_as``) provides."""
        return [their_index] if self.alias is None else self._ours.get(their_index, [])

    def max_requests(self) -> int:
        s = self._session
        if s.closed or not s.unchoking_us or self._banned():
            return 0
        return self.pipeline_depth()

    def max_request_bytes(self) -> int:
        return 1  # one piece per request: pipelining comes from concurrent requests

    def ready_at(self) -> float:
        return self._ready_at

    def _banned(self) -> bool:
        return self._session.host.is_banned(self._session.peer_id, self.manifest_id)

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        s = self._session
        host = s.host
        if self._banned():
            raise SourceError(f"peer {s.peer_id} is banned for this manifest")
        for ref in request.pieces:
            t0 = trio.current_time()
            theirs = ref.index if self.alias is None else self.alias[1][ref.index]
            try:
                conn = await s.peerwire()
                data = await conn.fetch(self.held_as, theirs, ref.length, ref.offset)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("piece %d from %s in %.3f s", ref.index, self.id[-15:], trio.current_time() - t0)
            except PeerRejected as exc:
                if exc.reason is RejectReason.NOT_HAVE:
                    s.lost_piece(self.held_as, theirs)
                    host.broken_promise(s.peer_id, self.manifest_id, f"refused piece {ref.index} it advertised")
                self._ready_at = trio.current_time() + 1.0
                raise
            except PeerStalled:
                host.broken_promise(s.peer_id, self.manifest_id, f"stalled on piece {ref.index} it advertised")
                self._ready_at = trio.current_time() + 2.0
                raise
            except SourceError:
                self._ready_at = trio.current_time() + 2.0
                raise
            self.bytes_received += len(data)
            host.stats.down_bytes += len(data)
            self.measure(len(data), trio.current_time())
            try:
                await sink.put(ref.index, data)
            except IntegrityError:
                host.ban(s.peer_id, self.manifest_id, f"piece {ref.index} failed its hash")
                raise

    async def aclose(self) -> None:
        pass


class Session:
    """One peer: its control stream, state machine, outbox and peerwire connection."""

    def __init__(self, host: SessionHost, stream: ControlStream, initiator: str) -> None:
        self.host = host
        self.stream = stream
        self.peer_id = stream.peer_id
        self.initiator = initiator
        cfg = host.config
        budget = cfg.budget
        key = cfg.swarm_key
        # A private swarm: the peer gets nothing until it proves the key (protocol/_control.py).
        proofs = None if key is None else (
            swarm_key_proof(key, host.local_peer_id, self.peer_id), swarm_key_proof(key, self.peer_id, host.local_peer_id)
        )
        self.conn = ControlConnection(
            trio.current_time(), keepalive_interval=cfg.keepalive_interval, idle_timeout=cfg.idle_timeout,
            max_manifests=budget.announced_manifests, max_bitfield_bytes=budget.announced_bitfield_bytes,
            key_proof=proofs,
        )
        self.key_proof = None if proofs is None else KeyProof(proofs[0])
        # The IP this session came from: the only host its peerwire endpoint may have.
        self.remote_host: str | None = getattr(stream, "remote_host", None)
        self.outbox_send, self.outbox_recv = trio.open_memory_channel[ControlMessage](1024)
        self.unchoking = False  # whether we unchoke this peer
        self.closed = False
        self.sources: dict[bytes, PeerSource] = {}
        # Alias sources, by the peer's manifest that holds the pieces (see PeerSource.alias).
        self.aliases: dict[bytes, PeerSource] = {}
        # Manifests posted to this peer in Hello or Announce (sent or still queued):
        # a Have for one of them may follow in the queue.
        self.announced: set[bytes] = set()
        # Manifests this peer has been introduced for (peer exchange runs once per manifest).
        self.introduced: set[bytes] = set()
        self._pw: PeerwireConnection | None = None
        self._pw_lock = trio.Lock()
        self._token_ready = trio.Event()
        self.cancel_scope = trio.CancelScope()
        # GetManifest budget: each envelope once per session, requests refilled
        # at manifest_requests_per_minute, reply bytes queued and not yet written.
        self.manifests_sent: set[bytes] = set()
        now = trio.current_time()
        per_minute = budget.manifest_requests_per_minute
        self._manifest_credit = TokenBucket(per_minute / 60, per_minute, now)
        self.manifest_bytes_queued = 0
        # Message rates (node/swarm/budget.py): over one, the session ends.
        self._rates = {
            "Have": TokenBucket(budget.haves_per_second, budget.have_burst, now),
            "Claim": TokenBucket(budget.claims_per_second, budget.claim_burst, now),
            "TokenRequest": TokenBucket(budget.token_requests_per_second, budget.token_request_burst, now),
            "Interested": TokenBucket(budget.interest_per_second, budget.interest_burst, now),
        }

    def within_rate(self, what: str) -> bool:
        """Spend one ``what`` (a key of ``_rates``) from the peer's budget; over it, the session ends (False)."""
        if self._rates[what].take(trio.current_time()):
            return True
        if not self.cancel_scope.cancel_called:
            log.warning("peer %s sends %s messages beyond its budget; dropping it", self.peer_id, what)
            self.host.stats.over_budget += 1
        self.cancel_scope.cancel()
        return False

    # -- what the peer told us -------------------------------------------------
    def holds(self, manifest_id: bytes) -> bool:
        """The peer announced ``manifest_id`` (it holds or fetches it) and the session is open."""
        return not self.closed and manifest_id in self.conn.theirs.manifests

    def bitfield(self, manifest_id: bytes) -> Bitfield | None:
        """The peer's pieces of ``manifest_id``, as it announced them (None: not announced)."""
        return self.conn.theirs.manifests.get(manifest_id)

    def manifests(self) -> Mapping[bytes, Bitfield]:
        """Every manifest the peer announced, with its pieces."""
        return self.conn.theirs.manifests

    @property
    def said_hello(self) -> bool:
        return self.conn.theirs.phase is not Phase.IDLE

    @property
    def unchoking_us(self) -> bool:
        """The peer serves our peerwire requests now."""
        return self.conn.theirs.phase is Phase.UNCHOKING

    @property
    def interested(self) -> bool:
        """The peer wants pieces from us (it said Interested for some manifest)."""
        return bool(self.conn.theirs.interested) and not self.closed

    # -- sources ---------------------------------------------------------------
    def all_sources(self) -> list[PeerSource]:
        """This peer as a source: of manifests it announced, and as an alias for others."""
        return [*self.sources.values(), *self.aliases.values()]

    def drop_aliases(self, manifest_id: bytes) -> list[PeerSource]:
        """Forget the alias sources that serve the fetch of ``manifest_id``; returns them."""
        gone = [src for src in self.aliases.values() if src.manifest_id == manifest_id]
        for src in gone:
            del self.aliases[src.held_as]
        return gone

    def sources_of(self, held_as: bytes) -> list[PeerSource]:
        """The sources fed by the peer's pieces of ``held_as``: direct and alias."""
        return [s for s in (self.sources.get(held_as), self.aliases.get(held_as)) if s is not None]

    # -- talking to the peer ---------------------------------------------------
    def post(self, msg: ControlMessage) -> None:
        """Queue a message for the writer. A peer this far behind is dropped."""
        if self.closed:
            return
        try:
            self.outbox_send.send_nowait(msg)
        except trio.WouldBlock:
            log.warning("peer %s is not reading its control stream; dropping it", self.peer_id)
            self.cancel_scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def serve_manifest(self, msg: GetManifest, envelope: bytes) -> None:
        """Answer a GetManifest within the peer's budget (docs/security.md, "Budgets per peer").

        Each envelope goes to a peer once per session; a peer that asks
        faster than ``manifest_requests_per_minute`` loses its session; while
        ``manifest_reply_bytes`` of replies wait to be written, more requests
        are not answered (the asker bounds its own wait).
        """
        budget = self.host.config.budget
        if not self._manifest_credit.take(trio.current_time()):
            log.warning("peer %s asks for manifests faster than %d a minute; dropping it", self.peer_id, budget.manifest_requests_per_minute)
            self.cancel_scope.cancel()
            return
        if msg.manifest_id in self.manifests_sent:
            return
        if envelope and self.manifest_bytes_queued + len(envelope) > budget.manifest_reply_bytes:
            log.info("peer %s has %d bytes of manifests queued: not answering", self.peer_id, self.manifest_bytes_queued)
            return
        if envelope:
            self.manifests_sent.add(msg.manifest_id)
            self.manifest_bytes_queued += len(envelope)
        self.post(ManifestData(msg.manifest_id, envelope))

    def set_unchoked(self, on: bool) -> None:
        if on != self.unchoking:
            self.unchoking = on
            self.post(Unchoke() if on else Choke())

    def lost_piece(self, manifest_id: bytes, index: int) -> None:
        """The peer refused a piece it advertised: forget that it has it."""
        bf = self.conn.theirs.manifests.get(manifest_id)
        if bf is not None and index < bf.size and bf.discard(index):
            self.host.stats.lost_pieces += 1
            log.info("peer %s advertised piece %d but cannot serve it", self.peer_id, index)
            for src in self.sources_of(manifest_id):
                self.host.availability_changed(src)

    async def peerwire(self) -> PeerwireConnection:
        async with self._pw_lock:
            if self._pw is not None and not self._pw.broken:
                return self._pw
            if self._pw is not None:
                await self._pw.aclose()
                self._pw = None
            theirs = self.conn.theirs
            if theirs.endpoint is None:
                raise SourceError(f"peer {self.peer_id} serves no pieces")
            if theirs.token is None:
                self._token_ready = trio.Event()
                self.post(TokenRequest())
                with trio.move_on_after(10):
                    await self._token_ready.wait()
                if theirs.token is None:
                    raise SourceError(f"peer {self.peer_id} sent no peerwire token")
            token, theirs.token = theirs.token, None  # one time only
            # The host is where this Noise-authenticated session came from, never
            # what the peer names (any string, a hostname, a third party's address):
            # only the port is the peer's word.
            # None over a relayed libp2p connection: paths.connect then uses a libp2p stream.
            port = theirs.endpoint.port
            self._pw = await self.host.paths.connect(self.peer_id, self.remote_host, port, token)
            return self._pw

    async def writer(self) -> None:
        """The only task that writes the stream: queued messages, and keepalives when due."""
        while True:
            deadline = self.conn.next_deadline()
            msg: ControlMessage | None = None
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                try:
                    msg = await self.outbox_recv.receive()
                except trio.EndOfChannel:
                    return
            now = trio.current_time()
            # handle_timer raises when the peer went silent.
            data = self.conn.handle_timer(now) if msg is None else self.conn.send(msg, now)
            replies = _reply_bytes(msg)
            if msg is not None:
                # Whatever else is queued goes out in the same write: one yamux
                # frame and one Noise record instead of one per Have (up to
                # about 1 MiB: never one huge write).
                parts = [data]
                size = len(data)
                for _ in range(_COALESCE_MAX):
                    if size >= _COALESCE_BYTES:
                        break
                    try:
                        more = self.outbox_recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    parts.append(self.conn.send(more, now))
                    size += len(parts[-1])
                    replies += _reply_bytes(more)
                data = b"".join(parts)
            if data:
                await self.stream.send_all(data)
            self.manifest_bytes_queued -= replies

    async def reader(self) -> None:
        while True:
            payload = self.conn.next_payload()
            if isinstance(payload, NeedData):
                self.conn.receive_data(await self.stream.receive_some(), trio.current_time())
                continue
            if isinstance(payload, Close):
                return
            if len(payload) > _DECODE_INLINE:
                # A big frame (ManifestData, an Announce bitfield, a crafted
                # nest of arrays) is decoded in a worker thread, one at a time
                # per session and _DECODE_THREADS for the node: a peer's decode
                # cost never stalls the event loop (the codec caps its objects).
                async with _DECODE_LIMIT:
                    msg = await trio.to_thread.run_sync(decode_control, payload)
            else:
                msg = decode_control(payload)
            ev = self.conn.accept(msg)
            if isinstance(ev, Close):
                return
            self.host.on_message(self, ev)

    def on_token(self) -> None:
        self._token_ready.set()

    async def aclose(self) -> None:
        self.closed = True
        self.outbox_send.close()
        if self._pw is not None:
            await self._pw.aclose()
        await self.stream.aclose()


def _reply_bytes(msg: ControlMessage | None) -> int:
    return len(msg.envelope) if isinstance(msg, ManifestData) else 0
