"""The swarm service: peer sessions, serving, choking, bans, and peers as fetch sources.

Theory of operation
-------------------
One :class:`Swarm` runs per node. It owns the libp2p adapter (``_p2p``), the
peerwire server and one :class:`_Session` per connected peer. A session is
one control stream (``/autoglm/swarm/1``) driven by the sans-IO
:class:`ControlConnection` in a pump loop, plus at most one peerwire client
connection to that peer, opened on first use with the one-time token from
the peer's Hello (a fresh one comes from TokenRequest/Token after a break).

Downloading: a fetch registers itself with :meth:`Swarm.attach` (a
:class:`FetchHandle`, the engine's view). For every session whose peer holds
that manifest the swarm adds a :class:`PeerSource` to the fetch and forwards
the peer's Have messages as availability changes. Pieces that the local node
verifies are announced to every session with Have.

Uploading: peers that say Interested compete for ``upload_slots``;
:func:`choose_unchoked` keeps the least-served of them unchoked (max-min
fairness over bytes served), re-evaluated every ``rechoke_interval`` and on
every change of interest. Peerwire requests from a choked or banned peer are
refused. Global up and down rate limits apply to all peerwire traffic.

Failures: a peer whose piece fails the hash is banned for that manifest
(never asked again, never served again) and reported. A peer that rejects a
piece it advertised loses it from its bitfield at once, so the picker turns
to others within one request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from autoglm.node._p2p import ControlStream, P2PNode, PeerAddr
from autoglm.node._peerwire import (
    PeerRejected,
    PeerwireConnection,
    PieceLocation,
    connect_peerwire,
    new_token,
    serve_peerwire,
)
from autoglm.node._ratelimit import RateLimiter
from autoglm.node._sources import FetchRequest, PieceSink, SourceKind
from autoglm.node.errors import (
    AutoglmError,
    IntegrityError,
    ProtocolError,
    RemoteProtocolError,
    SourceError,
    StorageError,
)
from autoglm.protocol import decode_signed_manifest
from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._control import (
    MAX_CLAIM,
    MAX_ENVELOPE,
    MAX_MANIFESTS,
    MAX_PEX_ADDRS,
    MAX_PEX_PEERS,
    Announce,
    Choke,
    Claim,
    Close,
    ControlConnection,
    ControlMessage,
    Endpoint,
    GetManifest,
    Have,
    Hello,
    Interested,
    ManifestData,
    ManifestState,
    NotInterested,
    PeerInfo,
    Peers,
    Phase,
    Token,
    TokenRequest,
    Unchoke,
)
from autoglm.protocol._frames import NeedData
from autoglm.protocol._peerwire import RejectReason

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = [
    "Announced",
    "FetchHandle",
    "PeerBanned",
    "PeerSource",
    "Swarm",
    "SwarmConfig",
    "SwarmEvent",
    "SwarmStats",
    "choose_unchoked",
]

log = logging.getLogger(__name__)

_PROVIDE_WINDOW, _PROVIDE_MAX = 10.0, 8
_COALESCE_MAX = 256  # queued control messages joined into one write
_DIAL_BACKOFF = 5.0  # seconds before an unreachable peer is dialled again
_WARM_BACKOFF = 60.0  # ... and before a connected peer that refused a warm session is asked again
_MAX_PROBED = 64  # other manifests a node asks its peers for (see Swarm._probe) ...
_MAX_FOREIGN_PIECES = 500_000  # ... and the piece hashes it keeps of them (~60 MB at most)
_HELLO_BUDGET = 3 * 1024 * 1024  # bytes of bitfields in one Hello (frames stop at 4 MiB)

#: Test hook: a node started with this set claims every piece of every manifest it holds.
LIE_ENV = "AUTOGLM_TEST_LIE_BITFIELD"


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    upload_slots: int = 8
    rechoke_interval: float = 5.0
    up_rate: float | None = None  # bytes/s, None: unlimited
    down_rate: float | None = None
    pipeline: int = 8  # requests in flight per peer
    peerwire_host: str = "127.0.0.1"
    peerwire_port: int = 0
    discover_interval: float = 3.0
    discover_fast: float = 0.25  # the discovery interval in a fetch's first discover_fast_for seconds
    discover_fast_for: float = 10.0
    # A holder whose session just ended stays in the first-copy membership this
    # long: a control stream that resets and is dialled again must not move
    # every piece's owner twice (each move costs mirror requests in flight).
    member_grace: float = 5.0
    # An introduced peer with a larger id waits this long for the smaller one
    # to dial (both dialling at once costs one of the two connections).
    intro_dial_delay: float = 1.0
    # Idle control sessions with up to this many connected peers, fetching or
    # not (0: sessions only for wanted manifests). A node that starts a fetch
    # then tells its peers with one Announce on streams that already exist,
    # instead of opening a stream (multistream negotiation, both sides dialling
    # at once) per peer while every node of the fleet does the same.
    warm_sessions: int = 32
    warm_interval: float = 1.0
    # discover_first returns once membership has been stable this long
    # (discover_alone while no other holder is known).
    discover_settle: float = 0.05
    discover_alone: float = 1.0
    reprovide_interval: float = 600.0
    keepalive_interval: float = 15.0
    idle_timeout: float = 45.0
    swarm_key: bytes | None = None  # private swarm: peerwire bytes sealed with ChaCha20-Poly1305


@dataclass(frozen=True, slots=True)
class Announced:
    """A provider record went into the DHT: ``kind`` is "manifest" or "file" (by SHA-256)."""

    kind: str
    key: bytes


@dataclass(frozen=True, slots=True)
class PeerBanned:
    peer_id: str
    manifest_id: bytes
    reason: str


SwarmEvent = Announced | PeerBanned


def choose_unchoked(interested: Iterable[str], served: dict[str, int], slots: int) -> set[str]:
    """Which interested peers to unchoke: the ``slots`` least served so far (ties by id)."""
    ranked = sorted(interested, key=lambda p: (served.get(p, 0), p))
    return set(ranked[: max(slots, 0)])


class FetchHandle(Protocol):
    """What the swarm needs from a running fetch (the engine's ``Fetch``)."""

    def add_source(self, source: PeerSource) -> None: ...

    def remove_source(self, source_id: str) -> None: ...

    def source_have(self, source_id: str, index: int) -> None: ...

    def source_bitfield(self, source_id: str, indices: Iterable[int]) -> None: ...

    def set_swarm(self, peers: Iterable[str], complete: Iterable[str] = ()) -> None:
        """The peers fetching this manifest, and those that hold all of it (first-copy spreading)."""
        ...

    def peer_progress(self, peer: str) -> None:
        """``peer`` announced a new piece of this manifest."""
        ...

    def peer_claims(self, peer: str, indices: Iterable[int]) -> None:
        """``peer`` asked a mirror for these pieces (its Claim)."""
        ...

    def mirror_claims(self) -> list[int]:
        """The pieces this fetch asked a mirror for and has not finished."""
        ...

    def piece_keys(self) -> list[tuple[bytes, int]]:
        """(BLAKE3 hash, length) of every piece of the manifest, in index order."""
        ...

    def file_sha256s(self) -> list[bytes]:
        """The SHA-256 of each wanted file that still misses pieces."""
        ...

    claim_listener: Callable[[list[int]], None] | None


class PieceStore(Protocol):
    """The slice of node/_store.Store the swarm uses."""

    def manifest_ids(self) -> list[bytes]: ...

    def bitfield(self, manifest_id: bytes) -> bytes: ...

    def piece_location(self, manifest_id: bytes, index: int) -> object: ...

    def written_here(self, manifest_id: bytes, index: int) -> bool: ...


@dataclass(slots=True)
class SwarmStats:
    up_bytes: int = 0
    down_bytes: int = 0
    bad_pieces: int = 0
    banned: list[tuple[str, str]] = field(default_factory=list)  # (peer id, manifest id hex)
    lost_claims: int = 0


@dataclass(slots=True)
class _Held:
    """A manifest this node holds (fully or partly): what Hello and Announce say."""

    piece_count: int
    have: Bitfield


class _Grant:
    def __init__(self, swarm: Swarm, peer_id: str) -> None:
        self._swarm = swarm
        self.peer_id = peer_id

    def check(self, manifest_id: bytes, index: int) -> RejectReason | None:
        sw = self._swarm
        if self.peer_id in sw._banned.get(manifest_id, ()):
            return RejectReason.BANNED
        sess = sw._sessions.get(self.peer_id)
        if sess is None or not sess.unchoking:
            return RejectReason.CHOKED
        held = sw._held.get(manifest_id)
        if held is None:
            return RejectReason.UNKNOWN_MANIFEST
        if index not in held.have:
            return RejectReason.NOT_HAVE
        return None

    def served(self, manifest_id: bytes, index: int, nbytes: int) -> None:
        sw = self._swarm
        sw.stats.up_bytes += nbytes
        sw._served[self.peer_id] = sw._served.get(self.peer_id, 0) + nbytes


class PeerSource:
    """One peer as a source of one manifest's pieces (the Source protocol of node/_sources.py)."""

    #: Keep about this many seconds of this peer's measured throughput in flight.
    QUEUE_TIME = 1.0
    MIN_DEPTH, MAX_DEPTH = 2, 32

    def __init__(self, session: _Session, manifest_id: bytes, alias: tuple[bytes, dict[int, int]] | None = None) -> None:
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

    def _measure(self, nbytes: int, now: float) -> None:
        if self._last is not None:
            inst = nbytes / max(now - self._last, 1e-3)
            self._rate = inst if self._rate == 0.0 else 0.8 * self._rate + 0.2 * inst
        self._last = now
        self._piece_len = nbytes

    def pipeline_depth(self) -> int:
        """Requests to keep in flight: QUEUE_TIME seconds of measured throughput (libtorrent's rule)."""
        if self._rate == 0.0 or not self._piece_len:
            return self._session.swarm.config.pipeline
        depth = int(self._rate * self.QUEUE_TIME / self._piece_len) + 1
        return max(self.MIN_DEPTH, min(self.MAX_DEPTH, depth))

    @property
    def id(self) -> str:
        if self.alias is not None:
            return f"peer:{self._session.peer_id}@{self.alias[0].hex()[:8]}"
        return f"peer:{self._session.peer_id}"

    @property
    def kind(self) -> SourceKind:
        return SourceKind.PEER

    def availability(self) -> Collection[int] | None:
        bf = self._session.conn.theirs.manifests.get(self.held_as)
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
        if s.closed or s.conn.theirs.phase is not Phase.UNCHOKING or self._banned():
            return 0
        return self.pipeline_depth()

    def max_request_bytes(self) -> int:
        return 1  # one piece per request: pipelining comes from concurrent requests

    def ready_at(self) -> float:
        return self._ready_at

    def _banned(self) -> bool:
        return self._session.peer_id in self._session.swarm._banned.get(self.manifest_id, ())

    async def fetch(self, request: FetchRequest, sink: PieceSink) -> None:
        s = self._session
        if self._banned():
            raise SourceError(f"peer {s.peer_id} is banned for this manifest")
        for ref in request.pieces:
            t0 = trio.current_time()
            theirs = ref.index if self.alias is None else self.alias[1][ref.index]
            try:
                conn = await s.peerwire()
                data = await conn.fetch(self.held_as, theirs, ref.length)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("piece %d from %s in %.3f s", ref.index, self.id[-15:], trio.current_time() - t0)
            except PeerRejected as exc:
                if exc.reason is RejectReason.NOT_HAVE:
                    s.lost_claim(self.held_as, theirs)
                self._ready_at = trio.current_time() + 1.0
                raise
            except SourceError:
                self._ready_at = trio.current_time() + 2.0
                raise
            self.bytes_received += len(data)
            s.swarm.stats.down_bytes += len(data)
            self._measure(len(data), trio.current_time())
            try:
                await sink.put(ref.index, data)
            except IntegrityError:
                s.swarm.ban(s.peer_id, self.manifest_id, f"piece {ref.index} failed its hash")
                raise

    async def aclose(self) -> None:
        pass


class _Session:
    """One peer: its control stream, state machine, outbox and peerwire connection."""

    def __init__(self, swarm: Swarm, stream: ControlStream, initiator: str) -> None:
        self.swarm = swarm
        self.stream = stream
        self.peer_id = stream.peer_id
        self.initiator = initiator
        cfg = swarm.config
        self.conn = ControlConnection(
            trio.current_time(), keepalive_interval=cfg.keepalive_interval, idle_timeout=cfg.idle_timeout
        )
        self.outbox_send, self.outbox_recv = trio.open_memory_channel[ControlMessage](1024)
        self.unchoking = False
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

    def all_sources(self) -> list[PeerSource]:
        """This peer as a source: of manifests it announced, and as an alias for others."""
        return [*self.sources.values(), *self.aliases.values()]

    def drop_aliases(self, manifest_id: bytes) -> list[PeerSource]:
        """Forget the alias sources that serve the fetch of ``manifest_id``; returns them."""
        gone = [src for src in self.aliases.values() if src.manifest_id == manifest_id]
        for src in gone:
            del self.aliases[src.held_as]
        return gone

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

    def set_unchoked(self, on: bool) -> None:
        if on != self.unchoking:
            self.unchoking = on
            self.post(Unchoke() if on else Choke())

    def lost_claim(self, manifest_id: bytes, index: int) -> None:
        """The peer refused a piece it advertised: forget that it has it."""
        bf = self.conn.theirs.manifests.get(manifest_id)
        if bf is not None and index < bf.size and bf.discard(index):
            self.swarm.stats.lost_claims += 1
            log.info("peer %s advertised piece %d but cannot serve it", self.peer_id, index)
            for src in (self.sources.get(manifest_id), self.aliases.get(manifest_id)):
                fetch = self.swarm._live_fetch(src)
                if src is not None and fetch is not None:
                    fetch.source_bitfield(src.id, src.availability() or ())

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
            ep = theirs.endpoint
            self._pw = await connect_peerwire(ep.host, ep.port, token, self.swarm.down, self.swarm.config.swarm_key)
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
            if msg is not None:
                # Whatever else is queued goes out in the same write: one yamux
                # frame and one Noise record instead of one per Have.
                parts = [data]
                for _ in range(_COALESCE_MAX):
                    try:
                        more = self.outbox_recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    parts.append(self.conn.send(more, now))
                data = b"".join(parts)
            if data:
                await self.stream.send_all(data)

    async def reader(self) -> None:
        while True:
            ev = self.conn.next_event()
            if isinstance(ev, NeedData):
                self.conn.receive_data(await self.stream.receive_some(), trio.current_time())
                continue
            if isinstance(ev, Close):
                return
            self.swarm._on_message(self, ev)

    def on_token(self) -> None:
        self._token_ready.set()

    async def aclose(self) -> None:
        self.closed = True
        self.outbox_send.close()
        if self._pw is not None:
            await self._pw.aclose()
        await self.stream.aclose()


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
        self.store = store
        self.config = config or SwarmConfig()
        self.stats = SwarmStats()
        self.up = RateLimiter(self.config.up_rate)
        self.down = RateLimiter(self.config.down_rate)
        self.endpoint: Endpoint | None = None
        self._sessions: dict[str, _Session] = {}
        self._tokens: dict[bytes, str] = {}
        self._held: dict[bytes, _Held] = {}
        self._fetches: dict[bytes, FetchHandle] = {}
        self._attached_at: dict[bytes, float] = {}
        self._banned: dict[bytes, set[str]] = {}
        self._served: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self._rechoke_now = trio.Event()
        self._wanted_changed = trio.Event()
        self._held_changed = trio.Event()
        # Set and replaced whenever a peer says Hello, Announce or sends a manifest;
        # waiters take the current event first, then check their condition.
        self._peers_changed = trio.Event()
        self._envelopes: dict[bytes, bytes] = {}
        # Other manifests peers hold, asked for (GetManifest) while fetching: an
        # identical file under another manifest is served by its holders too.
        self._asked: set[bytes] = set()
        self._foreign: dict[bytes, list[tuple[bytes, int]]] = {}  # manifest id -> (hash, length) per piece
        self._awaited: set[bytes] = set()  # envelopes fetch_manifest waits for (the only ones kept whole)
        self._provided: dict[bytes, tuple[float, int]] = {}
        self._dial_backoff: dict[str, float] = {}
        self._dialing: set[str] = set()  # peers being dialled after an introduction
        self._opening: dict[str, trio.Event] = {}  # control streams being opened, by peer
        # manifest -> peer -> (when its session ended, whether it was complete): see member_grace
        self._departed: dict[bytes, dict[str, tuple[float, bool]]] = {}
        self._dial_limit = trio.CapacityLimiter(8)
        self._provided_files: set[bytes] = set()
        self._provide_times: list[float] = []
        self._lie = os.environ.get(LIE_ENV) == "1"

    # -- lifecycle -------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[Swarm] = trio.TASK_STATUS_IGNORED) -> None:
        await self._load_held()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            host, port = await nursery.start(
                lambda task_status: serve_peerwire(
                    _StoreLocator(self),
                    self._redeem,
                    host=self.config.peerwire_host,
                    port=self.config.peerwire_port,
                    up=self.up,
                    psk=self.config.swarm_key,
                    task_status=task_status,
                )
            )
            self.endpoint = Endpoint(host, port)
            self.p2p.set_control_handler(self._accept_stream)
            nursery.start_soon(self._rechoker)
            nursery.start_soon(self._discoverer)
            nursery.start_soon(self._provider)
            if self.config.warm_sessions > 0:
                nursery.start_soon(self._warmer)
            task_status.started(self)

    async def _load_held(self) -> None:
        for mid in await trio.to_thread.run_sync(self.store.manifest_ids):
            await self.refresh_held(mid)

    async def refresh_held(self, mid: bytes) -> None:
        """Re-read a manifest's verified pieces from the store."""
        try:
            bits = await trio.to_thread.run_sync(self.store.bitfield, mid)
        except AutoglmError as exc:
            log.warning("cannot read the bitfield of %s: %s", mid.hex()[:16], exc)
            return
        n = _piece_count_of(self.store, mid, len(bits))
        self._held[mid] = _Held(n, Bitfield.from_bytes(bits, n))
        self._held_changed.set()

    # -- what we hold ----------------------------------------------------
    def hold(self, manifest_id: bytes, piece_count: int, have: Iterable[int] = (), envelope: bytes | None = None) -> None:
        """Start holding a manifest (a fetch began): announce it to peers and the DHT.

        ``envelope`` (the signed manifest) is what peers get when they ask for it by id.
        """
        if envelope is not None and len(envelope) <= MAX_ENVELOPE:
            self._envelopes[manifest_id] = envelope
        if manifest_id not in self._held:
            self._held[manifest_id] = _Held(piece_count, Bitfield(piece_count, have))
            state = self._state(manifest_id)
            for s in list(self._sessions.values()):
                s.announced.add(manifest_id)
                s.post(Announce(state))
            self._held_changed.set()

    def piece_verified(self, manifest_id: bytes, index: int) -> None:
        """A piece is durable and verified here: tell every peer."""
        held = self._held.get(manifest_id)
        if held is None or not held.have.add(index):
            return
        for s in list(self._sessions.values()):
            if manifest_id in s.announced:
                s.post(Have(manifest_id, index))

    def _state(self, mid: bytes) -> ManifestState:
        h = self._held[mid]
        have = Bitfield.full(h.piece_count) if self._lie else h.have
        return ManifestState(mid, h.piece_count, have.to_bytes())

    # -- fetching --------------------------------------------------------
    def attach(self, manifest_id: bytes, fetch: FetchHandle) -> None:
        """Make peers that hold ``manifest_id`` sources of ``fetch`` (now and as they appear)."""
        self._fetches[manifest_id] = fetch
        self._attached_at[manifest_id] = trio.current_time()
        fetch.claim_listener = lambda indices: self._post_claims(manifest_id, indices)
        for s in list(self._sessions.values()):
            self._probe(s)
        if self._nursery is not None:
            self._nursery.start_soon(self._discover_files, manifest_id)
        for s in list(self._sessions.values()):
            self._maybe_add_source(s, manifest_id)
        self._update_swarm(manifest_id)
        self._wanted_changed.set()

    def _update_swarm(self, mid: bytes) -> None:
        """Tell the fetch of ``mid`` which peers hold it too: fetching peers share the first copy."""
        fetch = self._fetches.get(mid)
        if fetch is None:
            return
        peers: list[str] = []
        complete: list[str] = []
        for p, s in self._sessions.items():
            bf = s.conn.theirs.manifests.get(mid)
            if bf is not None and not s.closed and p not in self._banned.get(mid, ()):
                (complete if bf.complete else peers).append(p)
        now = trio.current_time()
        gone = self._departed.get(mid, {})
        for p, (t, was_complete) in list(gone.items()):
            if p in self._sessions or now - t >= self.config.member_grace or p in self._banned.get(mid, ()):
                del gone[p]
            else:
                (complete if was_complete else peers).append(p)
        fetch.set_swarm(peers, complete)

    def fetching(self, manifest_id: bytes) -> bool:
        return manifest_id in self._fetches

    def detach(self, manifest_id: bytes) -> None:
        fetch = self._fetches.pop(manifest_id, None)
        if fetch is not None:
            fetch.claim_listener = None
        self._attached_at.pop(manifest_id, None)
        for s in list(self._sessions.values()):
            src = s.sources.pop(manifest_id, None)
            if src is not None:
                src.attached = False
                s.post(NotInterested(manifest_id))
            for alias in s.drop_aliases(manifest_id):
                alias.attached = False
                s.post(NotInterested(alias.held_as))

    def _live_fetch(self, src: PeerSource | None) -> FetchHandle | None:
        """The fetch ``src`` is a source of, if it is attached to it now."""
        return None if src is None or not src.attached else self._fetches.get(src.manifest_id)

    def _maybe_add_source(self, s: _Session, mid: bytes) -> None:
        fetch = self._fetches.get(mid)
        if fetch is None or mid in s.sources or mid not in s.conn.theirs.manifests:
            return
        if s.peer_id in self._banned.get(mid, ()):
            return
        src = s.sources[mid] = PeerSource(s, mid)
        log.info("peer %s holds %s", s.peer_id, mid.hex()[:16])
        s.post(Interested(mid))
        self._attach_source(s, src)

    def _attach_source(self, s: _Session, src: PeerSource) -> None:
        fetch = self._fetches.get(src.manifest_id)
        if fetch is None or src.attached or s.conn.theirs.phase is not Phase.UNCHOKING:
            return
        if s.peer_id in self._banned.get(src.manifest_id, ()):
            return
        src.attached = True
        fetch.add_source(src)

    def _detach_source(self, src: PeerSource) -> None:
        fetch = self._fetches.get(src.manifest_id)
        if src.attached and fetch is not None:
            fetch.remove_source(src.id)
        src.attached = False

    def ban(self, peer_id: str, manifest_id: bytes, why: str) -> None:
        """Never use nor serve ``peer_id`` for ``manifest_id`` again (this process)."""
        banned = self._banned.setdefault(manifest_id, set())
        if peer_id in banned:
            return
        banned.add(peer_id)
        self.stats.bad_pieces += 1
        self.stats.banned.append((peer_id, manifest_id.hex()))
        log.warning("banned peer %s for manifest %s: %s", peer_id, manifest_id.hex()[:16], why)
        self._emit(PeerBanned(peer_id, manifest_id, why))
        s = self._sessions.get(peer_id)
        if s is not None:
            fetch = self._fetches.get(manifest_id)
            for src in [s.sources.pop(manifest_id, None), *s.drop_aliases(manifest_id)]:
                if src is not None and src.attached and fetch is not None and self._nursery is not None:
                    # Removed from the next task step, so the engine first records
                    # the failure and reports it (SourceFailed, integrity=True).
                    self._nursery.start_soon(_remove_source, fetch, src.id)
        self._update_swarm(manifest_id)

    # -- sessions --------------------------------------------------------
    def _redeem(self, token: bytes) -> _Grant | None:
        peer = self._tokens.pop(token, None)
        return None if peer is None else _Grant(self, peer)

    def _issue_token(self, peer_id: str) -> bytes:
        tok = new_token()
        self._tokens[tok] = peer_id
        return tok

    async def _accept_stream(self, stream: ControlStream) -> None:
        await self._run_session(stream, initiator=stream.peer_id)

    async def connect_peer(self, peer: PeerAddr | str) -> None:
        """Open a session with a peer unless one exists. SourceError if unreachable.

        One open per peer at a time: a second caller (a warm dial, a DHT
        lookup and an introduction can all name the same peer at once) waits
        for the first. Two streams from the same initiator would leave each
        end keeping whichever registered first there, not always the same
        one, and both sessions would die.
        """
        pid = peer.peer_id if isinstance(peer, PeerAddr) else peer
        if pid in self._sessions or pid == self.p2p.peer_id:
            return
        pending = self._opening.get(pid)
        if pending is not None:
            await pending.wait()
            return
        self._opening[pid] = done = trio.Event()
        try:
            stream = await self.p2p.open_control(peer)
            assert self._nursery is not None
            s = self._new_session(stream, self.p2p.peer_id)  # registered before anyone else can look
            if s is None:
                await stream.aclose()
            else:
                self._nursery.start_soon(self._drive_session, s)
        finally:
            del self._opening[pid]
            done.set()

    def _register(self, s: _Session) -> bool:
        old = self._sessions.get(s.peer_id)
        if old is not None:
            # Both sides dialled at once: both keep the stream the smaller peer id opened.
            if old.initiator <= s.initiator:
                return False
            old.cancel_scope.cancel()
        self._sessions[s.peer_id] = s
        if self.p2p is not None:
            self.p2p.protect(s.peer_id)
        return True

    async def _run_session(self, stream: ControlStream, initiator: str) -> None:
        s = self._new_session(stream, initiator)
        if s is None:
            await stream.aclose()
            return
        await self._drive_session(s)

    def _new_session(self, stream: ControlStream, initiator: str) -> _Session | None:
        s = _Session(self, stream, initiator)
        if not self._register(s):
            return None
        log.info("session with %s started", s.peer_id)
        return s

    async def _drive_session(self, s: _Session) -> None:
        try:
            with s.cancel_scope:
                # Hello carries what fits in one frame; the rest follows as Announce.
                states = [self._state(m) for m in self._held]
                first, size = 0, 0
                while first < min(len(states), MAX_MANIFESTS) and size + len(states[first].bitfield) < _HELLO_BUDGET:
                    size += len(states[first].bitfield) + 64
                    first += 1
                s.post(Hello(tuple(states[:first]), self.endpoint, self._issue_token(s.peer_id)))
                for st in states[first:]:
                    s.post(Announce(st))
                s.announced.update(st.manifest_id for st in states)
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

    async def _end_session(self, s: _Session) -> None:
        if self._sessions.get(s.peer_id) is s:
            del self._sessions[s.peer_id]
            if self.p2p is not None:
                self.p2p.protect(s.peer_id, on=False)
            # Tokens this peer never redeemed die with its session.
            for tok in [t for t, p in self._tokens.items() if p == s.peer_id]:
                del self._tokens[tok]
        for src in s.all_sources():
            self._detach_source(src)
        s.sources.clear()
        s.aliases.clear()
        s.closed = True
        now = trio.current_time()
        redial = False
        for mid, bf in s.conn.theirs.manifests.items():
            if mid in self._fetches and s.peer_id not in self._sessions:
                redial = True
                self._departed.setdefault(mid, {})[s.peer_id] = (now, bf.complete)
                if self._nursery is not None:
                    self._nursery.start_soon(self._forget_departed, mid)
        if redial and self._nursery is not None and self.p2p is not None and s.peer_id not in self._dialing:
            # A holder of what we fetch dropped out (a reset connection, often a
            # loaded host): dial it again within the grace period rather than
            # wait for the DHT. The smaller peer id goes first, as for introductions.
            info = self._peer_info(s.peer_id)
            if info is not None:
                self._dial_later(PeerAddr(s.peer_id, info.addrs), "reconnect", after=0.2)
        for mid in list(self._fetches):
            self._update_swarm(mid)
        self._rechoke_now.set()
        self._notify_peers_changed()
        await s.aclose()

    async def _forget_departed(self, mid: bytes) -> None:
        await trio.sleep(self.config.member_grace)
        self._update_swarm(mid)

    def _on_message(self, s: _Session, msg: ControlMessage) -> None:
        if isinstance(msg, Hello | Announce):
            self._notify_peers_changed()
        match msg:
            case Hello() | Announce():
                states = msg.manifests if isinstance(msg, Hello) else (msg.state,)
                for st in states:
                    src = s.sources.get(st.manifest_id)
                    fetch = self._fetches.get(st.manifest_id)
                    if src is None:
                        self._maybe_add_source(s, st.manifest_id)
                    elif src.attached and fetch is not None:  # a re-announce replaces the bitfield
                        fetch.source_bitfield(src.id, s.conn.theirs.manifests[st.manifest_id])
                    self._update_swarm(st.manifest_id)
                    if st.manifest_id not in s.introduced:
                        s.introduced.add(st.manifest_id)
                        self._exchange_peers(s, st.manifest_id)
                        if fetch is not None:  # a new member hears what we already asked a mirror for
                            self._post_claims(st.manifest_id, fetch.mirror_claims(), only=s)
                    alias = s.aliases.get(st.manifest_id)
                    alias_fetch = self._live_fetch(alias)
                    if alias is not None and alias_fetch is not None:
                        alias_fetch.source_bitfield(alias.id, alias.availability() or ())
                self._probe(s)
            case Peers():
                self._on_peers(s, msg)
            case Claim():
                fetch = self._fetches.get(msg.manifest_id)
                if fetch is not None and s.peer_id not in self._banned.get(msg.manifest_id, ()):
                    fetch.peer_claims(s.peer_id, msg.indices)
            case Have():
                src = s.sources.get(msg.manifest_id)
                fetch = self._fetches.get(msg.manifest_id)
                if fetch is not None and log.isEnabledFor(logging.DEBUG):
                    log.debug("have %d from %s", msg.index, s.peer_id[-6:])
                if src is not None and src.attached and fetch is not None:
                    fetch.source_have(src.id, msg.index)
                alias = s.aliases.get(msg.manifest_id)
                alias_fetch = self._live_fetch(alias)
                if alias is not None and alias_fetch is not None:
                    for i in alias.ours(msg.index):
                        alias_fetch.source_have(alias.id, i)
                bf = s.conn.theirs.manifests.get(msg.manifest_id)
                if fetch is not None and bf is not None:
                    if not bf.complete:
                        fetch.peer_progress(s.peer_id)
                    else:
                        # Complete now, or claimed complete from the start: a Have from a
                        # peer that already "had" everything is no progress (a liar goes stale).
                        self._update_swarm(msg.manifest_id)
            case Interested() | NotInterested():
                self._rechoke_now.set()
            case TokenRequest():
                s.post(Token(self._issue_token(s.peer_id)))
            case GetManifest():
                s.post(ManifestData(msg.manifest_id, self._envelopes.get(msg.manifest_id, b"")))
            case ManifestData():
                self._on_manifest_data(s, msg)
            case Token():
                s.on_token()
            case Unchoke():
                for src in s.all_sources():
                    self._attach_source(s, src)
            case Choke():
                for src in s.all_sources():
                    self._detach_source(src)
            case _:
                pass

    def _post_claims(self, mid: bytes, indices: Sequence[int], only: _Session | None = None) -> None:
        """Tell the peers fetching ``mid`` which pieces we just asked a mirror for (see PiecePicker.peer_claims)."""
        if not indices:
            return
        for s in [only] if only is not None else list(self._sessions.values()):
            bf = s.conn.theirs.manifests.get(mid)
            if bf is None or bf.complete or mid not in s.announced or s.closed:
                continue
            for k in range(0, len(indices), MAX_CLAIM):
                s.post(Claim(mid, tuple(indices[k : k + MAX_CLAIM])))

    # -- peer exchange ----------------------------------------------------
    def _peer_info(self, peer_id: str) -> PeerInfo | None:
        addrs = self.p2p.peer_addrs(peer_id, MAX_PEX_ADDRS)
        return PeerInfo(peer_id, addrs) if addrs else None

    def _exchange_peers(self, s: _Session, mid: bytes) -> None:
        """``s`` said it holds or fetches ``mid``: introduce it and the other holders to each other.

        Every node dials its bootstrap peers first, so a bootstrap node acts
        as a tracker: nodes started together learn of each other within one
        round trip of their Hello, not after several DHT rounds (the first
        copy can only be spread among nodes that know each other).
        """
        others = [self._sessions[p] for p in self.holders(mid) if p != s.peer_id]
        if not others:
            return
        me = self._peer_info(s.peer_id)
        infos = []
        for o in others:
            if me is not None:
                o.post(Peers(mid, (me,)))
            info = self._peer_info(o.peer_id)
            if info is not None:
                infos.append(info)
        for i in range(0, len(infos), MAX_PEX_PEERS):
            s.post(Peers(mid, tuple(infos[i : i + MAX_PEX_PEERS])))

    def _on_peers(self, s: _Session, msg: Peers) -> None:
        # Advice from a peer: dialled only while fetching that manifest, each
        # at most once per backoff period; Noise checks every peer id.
        if msg.manifest_id not in self._fetches or self._nursery is None:
            return
        now = trio.current_time()
        for info in msg.peers:
            pid = info.peer_id
            if pid == self.p2p.peer_id or pid in self._sessions or pid in self._dialing or now < self._dial_backoff.get(pid, 0.0):
                continue
            self._dial_later(PeerAddr(pid, info.addrs), f"introduced by {s.peer_id}")

    async def _warmer(self) -> None:
        """Keep idle sessions with connected peers (``warm_sessions``), checked every ``warm_interval``.

        Peers libp2p is connected to come first (bootstrap, DHT traffic,
        inbound: a stream on an existing connection), then the rest of the DHT
        routing table, so a small fleet ends up fully meshed before anyone
        fetches. Both ends learn of each other at about the same time, so the
        smaller peer id dials and the other only if no session came of it.
        """
        while True:
            room = self.config.warm_sessions - len(self._sessions) - len(self._dialing)
            now = trio.current_time()
            candidates = [PeerAddr(p, ()) for p in self.p2p.connected_peers()] + self.p2p.routing_peers()
            for peer in candidates:
                if room <= 0:
                    break
                pid = peer.peer_id
                if pid == self.p2p.peer_id or pid in self._sessions or pid in self._dialing:
                    continue
                if now < self._dial_backoff.get(pid, 0.0):
                    continue
                self._dial_later(peer, "warm session", backoff=_WARM_BACKOFF)
                room -= 1
            await trio.sleep(self.config.warm_interval)

    def _dial_later(self, peer: PeerAddr, why: str, after: float = 0.0, backoff: float = _DIAL_BACKOFF) -> None:
        """Dial a peer we were told about (or lost) in the background, tracked in ``_dialing``.

        Both ends of an introduction (or of a lost session) learn of it at
        once: the smaller peer id dials, the other only if no session came
        of it within ``intro_dial_delay``.
        """
        assert self._nursery is not None
        self._dialing.add(peer.peer_id)
        delay = after + (0.0 if self.p2p.peer_id < peer.peer_id else self.config.intro_dial_delay)
        self._nursery.start_soon(self._dial_after, peer, why, delay, backoff)

    async def _dial_after(self, peer: PeerAddr, why: str, delay: float, backoff: float) -> None:
        try:
            if delay:
                await trio.sleep(delay)
                if peer.peer_id in self._sessions:
                    return
            await self._try_dial(peer, why, backoff)
        finally:
            self._dialing.discard(peer.peer_id)

    async def _try_dial(self, peer: PeerAddr | str, why: str, backoff: float = _DIAL_BACKOFF) -> None:
        """Open a session (at most 8 dials at once); an unreachable peer is not dialled again for ``backoff`` s."""
        pid = peer.peer_id if isinstance(peer, PeerAddr) else peer
        try:
            async with self._dial_limit:
                await self.connect_peer(peer)
        except AutoglmError as exc:
            self._dial_backoff[pid] = trio.current_time() + backoff
            log.info("peer %s (%s) unreachable: %s", pid, why, exc)

    # -- manifests by id (for name records) ------------------------------
    # -- identical files under other manifests --------------------------------
    def _probe(self, s: _Session) -> None:
        """While fetching, ask ``s`` for the manifests it holds that we do not know yet.

        A peer that holds an identical file under another manifest (another
        model, another version) can serve its pieces: their hashes are in
        that manifest. The envelope is only a map of hashes; nothing in it is
        trusted, every byte is checked against our own manifest.
        """
        if not self._fetches:
            return
        for mid, bf in s.conn.theirs.manifests.items():
            if mid in self._fetches or not len(bf):
                continue
            if mid in self._foreign:
                self._link(s, mid)
            elif mid not in self._asked and len(self._asked) < _MAX_PROBED:
                self._asked.add(mid)
                if mid in self._envelopes:
                    self._learn_foreign(mid, self._envelopes[mid])
                else:
                    s.post(GetManifest(mid))

    async def _discover_files(self, mid: bytes, delay: float = 2.0) -> None:
        """A while into a fetch: dial the DHT's providers of its files (identical files in other manifests).

        Later than the manifest lookup, and off the start's critical path: it
        is for pieces nobody fetching this manifest has.
        """
        await trio.sleep(delay)
        fetch = self._fetches.get(mid)
        # A fetch shared by several peers spreads the first copy among them, and
        # their sessions already show what else they hold: the lookups (a few
        # DHT round trips each, on every node) are for a node fetching nearly alone.
        if fetch is None or self.p2p is None or len(self.holders(mid)) >= 3:
            return
        for sha in fetch.file_sha256s()[:8]:
            if self._fetches.get(mid) is not fetch:
                return
            await self._dial_all(await self.p2p.find_file_providers(sha))

    def _learn_foreign(self, mid: bytes, envelope: bytes) -> None:
        try:
            signed = decode_signed_manifest(envelope)
        except RemoteProtocolError:
            return
        held = sum(len(k) for k in self._foreign.values())
        if signed.id != mid or held + signed.manifest.piece_count > _MAX_FOREIGN_PIECES:
            return
        self._foreign[mid] = [(p.hash, p.length) for _, p in signed.manifest.iter_pieces()]
        for s in list(self._sessions.values()):
            if mid in s.conn.theirs.manifests:
                self._link(s, mid)

    def _link(self, s: _Session, held_as: bytes) -> None:
        """Make ``s`` a source of a fetched manifest for the pieces it holds under ``held_as``."""
        if held_as in s.aliases:
            return
        theirs = {key: j for j, key in enumerate(self._foreign[held_as])}
        for mid, fetch in self._fetches.items():
            if mid == held_as or s.peer_id in self._banned.get(mid, ()):
                continue
            mapping = {i: theirs[key] for i, key in enumerate(fetch.piece_keys()) if key in theirs}
            if not mapping:
                continue
            src = s.aliases[held_as] = PeerSource(s, mid, (held_as, mapping))
            log.info("peer %s holds %d pieces of %s as %s", s.peer_id, len(mapping), mid.hex()[:16], held_as.hex()[:16])
            s.post(Interested(held_as))
            self._attach_source(s, src)
            return

    def _on_manifest_data(self, s: _Session, msg: ManifestData) -> None:
        if msg.envelope and msg.manifest_id in self._asked and msg.manifest_id not in self._foreign:
            self._learn_foreign(msg.manifest_id, msg.envelope)
        # Unasked envelopes are dropped: a peer cannot fill our memory with them.
        if not msg.envelope or msg.manifest_id in self._envelopes or msg.manifest_id not in self._awaited:
            return
        try:
            ok = decode_signed_manifest(msg.envelope).id == msg.manifest_id
        except RemoteProtocolError:
            ok = False
        if not ok:
            log.warning("peer %s sent a manifest that is not %s", s.peer_id, msg.manifest_id.hex()[:16])
            return
        # Only the id was checked here; signature and trust are the caller's check.
        self._envelopes[msg.manifest_id] = msg.envelope
        self._awaited.discard(msg.manifest_id)
        self._notify_peers_changed()

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

    def _notify_peers_changed(self) -> None:
        self._peers_changed.set()
        self._peers_changed = trio.Event()

    async def fetch_manifest(self, manifest_id: bytes) -> bytes:
        """The signed envelope of ``manifest_id`` from any peer that holds it (callers bound the wait)."""
        asked: set[str] = set()
        self._awaited.add(manifest_id)
        while manifest_id not in self._envelopes:
            changed = self._peers_changed
            await self._discover(manifest_id)
            for p, s in list(self._sessions.items()):
                if manifest_id in s.conn.theirs.manifests and p not in asked:
                    asked.add(p)
                    s.post(GetManifest(manifest_id))
            if manifest_id not in self._envelopes:
                with trio.move_on_after(self.config.discover_interval):
                    await changed.wait()
        return self._envelopes[manifest_id]

    # -- background loops ------------------------------------------------
    def rechoke(self) -> None:
        interested = [p for p, s in self._sessions.items() if s.conn.theirs.interested and not s.closed]
        keep = choose_unchoked(interested, self._served, self.config.upload_slots)
        for p, s in self._sessions.items():
            s.set_unchoked(p in keep)

    async def _rechoker(self) -> None:
        while True:
            self.rechoke()
            with trio.move_on_after(self.config.rechoke_interval):
                await self._rechoke_now.wait()
            self._rechoke_now = trio.Event()

    async def _discover(self, mid: bytes) -> None:
        # Peers we are already connected to over libp2p (bootstrap peers, DHT
        # neighbours) get a session first when nobody holding the manifest is
        # known yet: a Hello costs one round trip (and a bootstrap node
        # introduces the holders it knows), a DHT lookup several.
        if not self.holders(mid):
            await self._dial_all(self.p2p.connected_peers())
        await self._dial_all(await self.p2p.find_manifest_providers(mid))

    async def _dial_all(self, candidates: Sequence[PeerAddr | str]) -> None:
        now = trio.current_time()
        async with trio.open_nursery() as nursery:
            for peer in candidates:
                pid = peer.peer_id if isinstance(peer, PeerAddr) else peer
                if pid not in self._sessions and now >= self._dial_backoff.get(pid, 0.0):
                    nursery.start_soon(self._try_dial, peer, "discovery")

    async def discover_first(self, mid: bytes) -> None:
        """Before a fetch starts: find peers holding ``mid`` and wait for their Hellos.

        Peers known before the first request keep mirrors to the pieces no
        peer has, and share the first copy (picker rule 6); a mirror request
        withdrawn later, because its piece turned out to be another node's,
        is origin egress thrown away. So: open sessions with the peers we are
        already connected to (the bootstrap nodes, which introduce every
        other holder they know with ``Peers``), look the manifest up in the
        DHT in the background, and return once membership has been stable
        for ``discover_settle`` seconds: no session still waiting for its Hello, no
        introduced peer still being dialled, no new holder. Callers bound the
        whole wait.
        """
        looked_up = trio.Event()

        async def lookup() -> None:
            await self._discover(mid)
            looked_up.set()
            self._notify_peers_changed()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup)
            known: frozenset[str] = frozenset()
            while True:
                changed = self._peers_changed
                # Alone so far: wait longer for news. Nodes started together (a fleet
                # booting with `join --seed`) reach the bootstrap node, and hear of
                # each other through it, within a second; a node that starts alone
                # spends mirror connections on pieces another node may bring in too.
                settle = self.config.discover_settle if known else self.config.discover_alone
                with trio.move_on_after(settle) as quiet:
                    await changed.wait()
                # A delayed dial to a peer that meanwhile dialled us is not discovery in progress.
                busy = any(p not in self._sessions for p in self._dialing) or any(
                    s.conn.theirs.phase is Phase.IDLE for s in self._sessions.values()
                )
                holders = frozenset(self.holders(mid))
                # Nobody holds it (a new network): done once the DHT lookup came back empty.
                if quiet.cancelled_caught and not busy and holders == known and (holders or looked_up.is_set()):
                    break
                known = holders
            nursery.cancel_scope.cancel()

    async def _discoverer(self) -> None:
        """While fetching, keep finding providers of each wanted manifest and open sessions.

        Strategy: nodes started together publish their provider records
        moments after each other, so the first seconds of a fetch look often
        (``discover_fast``) until some peer holding the manifest is in
        session; from then on peer exchange (``Peers``) introduces the rest
        and the DHT is asked every ``discover_interval``.
        """
        while True:
            for mid in list(self._fetches):
                await self._discover(mid)
            now = trio.current_time()
            # Fast rounds only while a young fetch knows no other holder: once one
            # session holds the manifest, peer exchange brings the rest (a DHT
            # lookup costs every node on the path a stream and a query).
            young = any(
                now - t < self.config.discover_fast_for and not self.holders(mid) for mid, t in self._attached_at.items()
            )
            interval = min(self.config.discover_interval, self.config.discover_fast) if young else self.config.discover_interval
            with trio.move_on_after(interval):
                await self._wanted_changed.wait()
            self._wanted_changed = trio.Event()

    def holders(self, mid: bytes) -> list[str]:
        """Peers in session that hold (or are fetching) ``mid``."""
        return [p for p, s in self._sessions.items() if not s.closed and mid in s.conn.theirs.manifests]

    def _needs_provide(self, mid: bytes, now: float) -> bool:
        # Announce when never announced, when the record is due for refresh, and
        # when the routing table has grown a lot since (we joined more of the
        # network, so the record belongs on other nodes too).
        last = self._provided.get(mid)
        if last is None:
            return True
        t, size = last
        return now - t >= self.config.reprovide_interval or self.p2p.dht_size() >= 2 * size + 1

    async def _provide_paced(self, provide: Callable[[bytes], Awaitable[bool]], key: bytes) -> bool:
        # Receivers drop ADD_PROVIDER beyond 10 per 10 s per peer, silently:
        # stay under that by spacing our announcements.
        now = trio.current_time()
        self._provide_times = [t for t in self._provide_times if now - t < _PROVIDE_WINDOW]
        if len(self._provide_times) >= _PROVIDE_MAX:
            await trio.sleep_until(self._provide_times[0] + _PROVIDE_WINDOW)
        self._provide_times.append(trio.current_time())
        return await provide(key)

    async def _provider(self) -> None:
        """Announce held manifests, and files held whole, in the DHT: never per piece."""
        while True:
            now = trio.current_time()
            for mid in list(self._held):
                if self._needs_provide(mid, now):
                    size = self.p2p.dht_size()
                    if await self._provide_paced(self.p2p.provide_manifest, mid):
                        self._provided[mid] = (trio.current_time(), size)
                        self._emit(Announced("manifest", mid))
                        self._provided_files.difference_update(_file_hashes_of(self.store, mid))
                held = self._held.get(mid)
                for sha in _complete_file_hashes(self.store, mid, held.have) if held else ():
                    if sha not in self._provided_files and await self._provide_paced(self.p2p.provide_file, sha):
                        self._provided_files.add(sha)
                        self._emit(Announced("file", sha))
            with trio.move_on_after(5.0):
                await self._held_changed.wait()
            self._held_changed = trio.Event()

    def status(self) -> dict[str, object]:
        """A JSON-ready snapshot for `autoglm-node status`."""
        return {
            "peer_id": self.p2p.peer_id,
            "addrs": self.p2p.addrs(),
            "peerwire": None if self.endpoint is None else f"{self.endpoint.host}:{self.endpoint.port}",
            "dht_size": self.p2p.dht_size(),
            "peers": [
                {
                    "peer_id": p,
                    "unchoked_by_us": s.unchoking,
                    "unchoking_us": s.conn.theirs.phase is Phase.UNCHOKING,
                    "manifests": {m.hex(): len(bf) for m, bf in s.conn.theirs.manifests.items()},
                    "served_bytes": self._served.get(p, 0),
                }
                for p, s in self._sessions.items()
            ],
            "held": {m.hex(): {"have": len(h.have), "pieces": h.piece_count} for m, h in self._held.items()},
            "up_bytes": self.stats.up_bytes,
            "down_bytes": self.stats.down_bytes,
            "banned": [list(b) for b in self.stats.banned],
            "lost_claims": self.stats.lost_claims,
        }


async def _remove_source(fetch: FetchHandle, source_id: str) -> None:
    fetch.remove_source(source_id)


class _StoreLocator:
    """Serve only what this node has verified: the held bitfield, then the store's location."""

    def __init__(self, swarm: Swarm) -> None:
        self._swarm = swarm

    def locate(self, manifest_id: bytes, index: int) -> PieceLocation | None:
        held = self._swarm._held.get(manifest_id)
        if held is None or index not in held.have:
            return None
        try:
            loc = self._swarm.store.piece_location(manifest_id, index)
        except (StorageError, KeyError, IndexError):
            return None
        trusted = self._swarm.store.written_here(manifest_id, index)
        return PieceLocation(os.fspath(loc.path), loc.offset, loc.length, loc.hash, trusted)  # type: ignore[attr-defined]


def _manifest_of(store: PieceStore, mid: bytes) -> object | None:
    get_map = getattr(store, "_map", None)
    if get_map is None:
        return None
    try:
        manifest: object = get_map(mid).manifest
    except (AutoglmError, KeyError):
        return None
    return manifest


def _piece_count_of(store: PieceStore, mid: bytes, nbytes: int) -> int:
    m = _manifest_of(store, mid)
    return int(m.piece_count) if m is not None else nbytes * 8  # type: ignore[attr-defined]


def _file_hashes_of(store: PieceStore, mid: bytes) -> Sequence[bytes]:
    m = _manifest_of(store, mid)
    return [f.sha256 for f in m.files] if m is not None else []  # type: ignore[attr-defined]



def _complete_file_hashes(store: PieceStore, mid: bytes, have: Bitfield) -> list[bytes]:
    """SHA-256 of each file of ``mid`` whose every piece is held."""
    m = _manifest_of(store, mid)
    if m is None:
        return []
    out, start = [], 0
    for f in m.files:  # type: ignore[attr-defined]
        n = len(f.pieces)
        if all(i in have for i in range(start, start + n)):
            out.append(f.sha256)
        start += n
    return out
