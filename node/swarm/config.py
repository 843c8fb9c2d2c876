"""The swarm's settings, events and counters, and the two interfaces it works through.

:class:`FetchHandle` is what the swarm needs of a running fetch (the engine's
``Fetch`` implements it); :class:`PieceStore` the slice of the store it
serves from (``node/_store.Store`` implements it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from autoglm.node._sources import Source
from autoglm.node._store import PieceLocation
from autoglm.protocol import Manifest

__all__ = [
    "Announced", "FetchHandle", "PeerBanned", "PeerBudget", "PieceStore", "SwarmConfig", "SwarmEvent", "SwarmStats",
]


@dataclass(frozen=True, slots=True)
class PeerBudget:
    """What one peer may cost this node: every per-peer limit in one place (docs/security.md, "Budgets per peer").

    A peer that goes over a budget that only a hostile peer reaches (bitfield
    memory, manifest requests) loses its session; a budget an honest peer may
    touch (tokens, connections, queued dials) refuses the excess instead.
    """

    # What a peer announced (Hello/Announce), kept per session: manifests and their bitfields.
    announced_manifests: int = 256
    announced_bitfield_bytes: int = 4 * 1024 * 1024
    # Live one-time peerwire tokens issued to one peer (the oldest is revoked
    # beyond this), and how long an unredeemed token lives.
    tokens: int = 4
    token_ttl: float = 60.0
    # Open peerwire connections one peer may hold to our server at once.
    peerwire_conns: int = 4
    # An authenticated peerwire connection with nothing in flight is closed after this long.
    peerwire_idle: float = 120.0
    # Dials a peer's introductions (Peers messages) may queue: per introducer, and for all peers.
    intro_dials_per_peer: int = 16
    intro_dials_total: int = 64
    # GetManifest: replies in flight per peer (bytes queued, not yet written), and requests per minute.
    manifest_reply_bytes: int = 8 * 1024 * 1024
    manifest_requests_per_minute: int = 64
    # Have and Claim messages per second, with the burst a peer may save up
    # (token buckets). An honest peer sends one Have per piece it verifies
    # (a group commit posts a batch at once) and one Claim per mirror request
    # or, to a new member, its claims in bulk; these are far above that.
    haves_per_second: float = 2000.0
    have_burst: int = 8192
    claims_per_second: float = 100.0
    claim_burst: int = 512
    # TokenRequest (one per peerwire connection an honest peer opens) and
    # Interested/NotInterested (one per manifest it starts or stops wanting).
    token_requests_per_second: float = 10.0
    token_request_burst: int = 64
    interest_per_second: float = 50.0
    interest_burst: int = 512
    # Broken promises: requests for a piece the peer advertised that it then
    # refused as not held or stalled on. This many within the window is a lie
    # told repeatedly: the peer is banned for that manifest for promise_ban.
    broken_promises: int = 3
    broken_promise_window: float = 600.0
    promise_ban: float = 900.0


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
    # Under load a reset session takes 10-50 s to come back (median 17-22 s at
    # N=16 on 2 cores, docs/benchmarks.md "The start race"); 5 s let most of
    # them move every owner twice. A departed member is relayed meanwhile.
    member_grace: float = 30.0
    # A holder of nothing that has not said Interested (yet) is a first-copy
    # member for this long from when it announced the manifest (or the fetch
    # began): a fetcher's Interested answers our Announce a round trip later,
    # and its share must not be taken from a mirror meanwhile (protocol/_membership.py).
    first_round: float = 1.0
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
    budget: PeerBudget = field(default_factory=PeerBudget)  # what one peer may cost us


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


@dataclass(slots=True)
class SwarmStats:
    up_bytes: int = 0
    down_bytes: int = 0
    bad_pieces: int = 0
    banned: list[tuple[str, str]] = field(default_factory=list)  # (peer id, manifest id hex)
    lost_pieces: int = 0  # pieces a peer advertised and then could not serve
    over_budget: int = 0  # sessions ended for message rates beyond the peer budget


class FetchHandle(Protocol):
    """What the swarm needs from a running fetch (the engine's ``Fetch``)."""

    def add_source(self, source: Source) -> None: ...

    def remove_source(self, source_id: str) -> None: ...

    def source_have(self, source_id: str, index: int) -> None: ...

    def source_bitfield(self, source_id: str, indices: Iterable[int]) -> None: ...

    def set_swarm(self, peers: Iterable[str], complete: Iterable[str] = (), relayed: Iterable[str] = ()) -> None:
        """The peers fetching this manifest, those that hold all of it, and those known by peer exchange only."""
        ...

    def peer_progress(self, peer: str, index: int) -> None:
        """``peer`` sent a Have for piece ``index`` of this manifest (first-copy progress, if new)."""
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


class PieceStore(Protocol):
    """The slice of node/_store.Store the swarm uses (blocking: call from a worker thread)."""

    def manifest_ids(self) -> list[bytes]: ...

    def manifest(self, manifest_id: bytes) -> Manifest: ...

    def bitfield(self, manifest_id: bytes) -> bytes: ...

    def piece_location(self, manifest_id: bytes, index: int) -> PieceLocation: ...

    def written_here(self, manifest_id: bytes, index: int) -> bool: ...
