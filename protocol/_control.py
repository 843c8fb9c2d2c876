"""The swarm control protocol ``/autoglm/swarm/1``, sans-IO.

Theory of operation
-------------------
Two nodes open one control stream over a Noise-authenticated libp2p
connection. Each side first sends ``Hello``: the manifests it holds with a
bitfield each, the TCP endpoint of its bulk piece transport (peerwire) and a
one-time token the other side presents when it opens a peerwire connection.
After that either side may send, in any order: ``Announce`` (a manifest
started after the handshake), ``Have`` (one more verified piece),
``Interested``/``NotInterested``, ``Choke``/``Unchoke`` (whether the sender
will serve the receiver's peerwire requests), ``TokenRequest``/``Token`` (a
fresh one-time token after a peerwire connection broke),
``GetManifest``/``ManifestData`` (the signed manifest envelope for an id, so
a node that resolved a name record can fetch the manifest from peers),
``Peers`` (peer exchange: other nodes the sender has a session with that hold
or fetch a manifest, with their libp2p addresses), ``Claim`` (the sender is
fetching these pieces of a manifest it announced from a mirror: the first
copy of each comes from it), ``Keepalive`` and finally ``Close``.

Private swarms (a swarm key configured): before anything else each side
sends ``KeyProof``, an HMAC-SHA256 under the swarm key over both peer ids
(sender first; Noise has proven both ids, so a proof cannot be replayed by
anyone else). A side with a key sends nothing but its proof, and accepts
nothing, until the peer's proof checked; a wrong or missing proof ends the
session before any manifest id, token or address is said. Nodes without a
key never send KeyProof and refuse one.

Each direction has a phase: IDLE until its Hello, then CHOKING or UNCHOKING
(what the sender last said about serving the other side), then CLOSED. Every
allowed (phase, message) pair is in :data:`TRANSITIONS`; a missing pair is a
protocol error, local when we try to send it and remote when we receive it.

Time is a parameter: callers pass ``now`` in, ask :meth:`ControlConnection.next_deadline`
and call :meth:`ControlConnection.handle_timer` when it passes. The side that
has been silent for ``keepalive_interval`` sends a Keepalive; a peer silent for
``idle_timeout`` (or with no Hello after ``handshake_timeout``) is an error.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ._bitfield import Bitfield
from ._codec import Limits, decode_frame_payload, encode_frame_payload
from ._errors import LocalProtocolError, RemoteProtocolError
from ._frames import NEED_DATA, FrameDecoder, NeedData, encode_frame

__all__ = [
    "CONTROL_PROTOCOL_ID",
    "CONTROL_VERSION",
    "TRANSITIONS",
    "Announce",
    "Choke",
    "Close",
    "ControlConnection",
    "Claim",
    "ControlMessage",
    "Endpoint",
    "GetManifest",
    "Have",
    "Hello",
    "Interested",
    "Keepalive",
    "KeyProof",
    "MESSAGES",
    "ManifestData",
    "ManifestState",
    "NotInterested",
    "PeerInfo",
    "Peers",
    "Phase",
    "Token",
    "TokenRequest",
    "Unchoke",
    "decode_control",
    "encode_control",
    "swarm_key_proof",
]

CONTROL_PROTOCOL_ID: Final = "/autoglm/swarm/1"
CONTROL_VERSION: Final = 1
MAX_CONTROL_FRAME: Final = 4 * 1024 * 1024
MAX_MANIFESTS: Final = 64
MAX_PIECES: Final = 2_000_000
TOKEN_MIN, TOKEN_MAX = 16, 64
ID_LEN: Final = 32
MAX_ENVELOPE: Final = MAX_CONTROL_FRAME - 64
MAX_PEX_PEERS: Final = 50  # peers in one Peers message
MAX_PEX_ADDRS: Final = 8  # multiaddrs per peer
MAX_PEER_ID: Final = 128  # characters of a base58 peer id
MAX_CLAIM: Final = 64  # piece indices in one Claim message (the codec allows arrays of 64)
MAX_ADDR: Final = 256  # characters of one multiaddr
_LIMITS: Final = Limits(
    max_bytes=MAX_CONTROL_FRAME,
    max_str_len=1024,
    max_bin_len=MAX_ENVELOPE,
    max_array_len=MAX_MANIFESTS,
    max_map_len=0,
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a node's peerwire server listens."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ManifestState:
    """A manifest a node holds (or is fetching) and which of its pieces it has."""

    manifest_id: bytes
    piece_count: int
    bitfield: bytes


@dataclass(frozen=True, slots=True)
class Hello:
    manifests: tuple[ManifestState, ...]
    endpoint: Endpoint | None
    token: bytes
    version: int = CONTROL_VERSION


@dataclass(frozen=True, slots=True)
class Announce:
    state: ManifestState


@dataclass(frozen=True, slots=True)
class Have:
    manifest_id: bytes
    index: int


@dataclass(frozen=True, slots=True)
class Interested:
    manifest_id: bytes


@dataclass(frozen=True, slots=True)
class NotInterested:
    manifest_id: bytes


@dataclass(frozen=True, slots=True)
class Choke:
    pass


@dataclass(frozen=True, slots=True)
class Unchoke:
    pass


@dataclass(frozen=True, slots=True)
class Keepalive:
    pass


@dataclass(frozen=True, slots=True)
class TokenRequest:
    pass


@dataclass(frozen=True, slots=True)
class Token:
    token: bytes


@dataclass(frozen=True, slots=True)
class GetManifest:
    manifest_id: bytes


@dataclass(frozen=True, slots=True)
class ManifestData:
    """The signed envelope of ``manifest_id``; empty when the sender does not have it."""

    manifest_id: bytes
    envelope: bytes


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A libp2p peer id and the multiaddrs it can be dialled on (text, as libp2p writes them)."""

    peer_id: str
    addrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Peers:
    """Peer exchange: nodes the sender is in session with that hold or fetch ``manifest_id``.

    Advice only: the receiver dials them (Noise checks each peer id) and
    learns their pieces from their own Hello, never from this message.
    """

    manifest_id: bytes
    peers: tuple[PeerInfo, ...]


@dataclass(frozen=True, slots=True)
class Claim:
    """The sender has just asked a mirror for these pieces of ``manifest_id``.

    Nodes that fetch the same manifest leave them to the sender (the first
    copy of a piece comes into the swarm once) until it goes stale, whoever
    owned them by the rendezvous rule. Advice only: nothing is trusted from
    it but the piece numbers, which must fit the manifest the sender announced.
    """

    manifest_id: bytes
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Close:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class KeyProof:
    """The sender holds the swarm key: :func:`swarm_key_proof` (sender id, receiver id)."""

    mac: bytes


def swarm_key_proof(key: bytes, sender: str, receiver: str) -> bytes:
    """HMAC-SHA256 under the swarm key over both Noise-proven peer ids, sender first."""
    msg = b"autoglm-node/swarm-key/v1\0" + sender.encode() + b"\0" + receiver.encode()
    return hmac.new(key, msg, hashlib.sha256).digest()


ControlMessage = (
    Hello
    | Announce
    | Have
    | Interested
    | NotInterested
    | Choke
    | Unchoke
    | Keepalive
    | TokenRequest
    | Token
    | GetManifest
    | ManifestData
    | Peers
    | Claim
    | Close
    | KeyProof
)


class Phase(enum.Enum):
    IDLE = "idle"
    CHOKING = "choking"
    UNCHOKING = "unchoking"
    CLOSED = "closed"


_OPEN = (Phase.CHOKING, Phase.UNCHOKING)
_SELF_LOOPS = (
    Announce, Have, Interested, NotInterested, Keepalive, TokenRequest, Token, GetManifest, ManifestData, Peers, Claim,
)

#: (phase of the sending direction, message type) -> next phase of that direction.
TRANSITIONS: Final[dict[tuple[Phase, type], Phase]] = {
    (Phase.IDLE, Hello): Phase.CHOKING,
    (Phase.IDLE, Close): Phase.CLOSED,
    (Phase.IDLE, KeyProof): Phase.IDLE,  # private swarms only, first and once (ControlConnection)
    **{(p, t): p for p in _OPEN for t in _SELF_LOOPS},
    **{(p, Choke): Phase.CHOKING for p in _OPEN},
    **{(p, Unchoke): Phase.UNCHOKING for p in _OPEN},
    **{(p, Close): Phase.CLOSED for p in _OPEN},
}

# -- wire form ---------------------------------------------------------------
# A message is the array [code, field, ...]. One table holds every message:
# its code, its class and its fields in wire order, each with an encoder and
# a decoder that validates (RemoteProtocolError). A code missing from the
# table is a protocol error, never a default message.


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RemoteProtocolError(f"{what} must be an integer in {lo}..{hi}")
    return v


def _bin(v: Any, lo: int, hi: int, what: str) -> bytes:
    if not isinstance(v, bytes) or not lo <= len(v) <= hi:
        raise RemoteProtocolError(f"{what} must be {lo}..{hi} bytes")
    return v


def _mid(v: Any) -> bytes:
    return _bin(v, ID_LEN, ID_LEN, "manifest id")


def _state(v: Any) -> ManifestState:
    if not isinstance(v, list) or len(v) != 3:
        raise RemoteProtocolError("manifest state must be [id, piece_count, bitfield]")
    mid, n = _mid(v[0]), _int(v[1], 0, MAX_PIECES, "piece count")
    Bitfield.from_bytes(_bin(v[2], 0, (MAX_PIECES + 7) // 8, "bitfield"), n)
    return ManifestState(mid, n, v[2])


def _state_value(s: ManifestState) -> list[Any]:
    return [s.manifest_id, s.piece_count, s.bitfield]


def _states(v: Any) -> tuple[ManifestState, ...]:
    if not isinstance(v, list):
        raise RemoteProtocolError("hello manifests must be an array")
    states = tuple(_state(s) for s in v)
    if len({s.manifest_id for s in states}) != len(states):
        raise RemoteProtocolError("hello lists a manifest twice")
    return states


def _endpoint(v: Any) -> Endpoint | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 2 or not isinstance(v[0], str) or not v[0]:
        raise RemoteProtocolError("endpoint must be [host, port]")
    return Endpoint(v[0], _int(v[1], 1, 65535, "port"))


def _text(v: Any, hi: int, what: str) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= hi:
        raise RemoteProtocolError(f"{what} must be text of 1..{hi} characters")
    return v


def _peer_info(v: Any) -> PeerInfo:
    if not isinstance(v, list) or len(v) != 2 or not isinstance(v[1], list):
        raise RemoteProtocolError("peer must be [peer id, [multiaddr, ...]]")
    if len(v[1]) > MAX_PEX_ADDRS:
        raise RemoteProtocolError(f"a peer may list at most {MAX_PEX_ADDRS} addresses")
    return PeerInfo(_text(v[0], MAX_PEER_ID, "peer id"), tuple(_text(a, MAX_ADDR, "multiaddr") for a in v[1]))


def _peer_infos(v: Any) -> tuple[PeerInfo, ...]:
    if not isinstance(v, list) or len(v) > MAX_PEX_PEERS:
        raise RemoteProtocolError(f"peers must be an array of at most {MAX_PEX_PEERS}")
    return tuple(_peer_info(p) for p in v)


def _indices(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_CLAIM:
        raise RemoteProtocolError(f"claimed pieces must be an array of 1..{MAX_CLAIM}")
    return tuple(_int(i, 0, MAX_PIECES - 1, "piece index") for i in v)


def _reason(v: Any) -> str:
    if not isinstance(v, str):
        raise RemoteProtocolError("close reason must be text")
    return v[:200]


def _same(v: Any) -> Any:
    return v


@dataclass(frozen=True, slots=True)
class _Field:
    """One field of a message: its attribute, how it goes on the wire, how it comes off (validated)."""

    name: str
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any] = _same


_MID = _Field("manifest_id", _mid)
_TOKEN = _Field("token", lambda v: _bin(v, TOKEN_MIN, TOKEN_MAX, "token"))

#: Wire code -> (message class, fields in wire order). Never reuse a number.
MESSAGES: Final[dict[int, tuple[type[ControlMessage], tuple[_Field, ...]]]] = {
    1: (Hello, (
        _Field("version", lambda v: _int(v, 0, 2**32, "version")),
        _Field("manifests", _states, lambda ms: [_state_value(s) for s in ms]),
        _Field("endpoint", _endpoint, lambda ep: None if ep is None else [ep.host, ep.port]),
        _TOKEN,
    )),
    2: (Announce, (_Field("state", _state, _state_value),)),
    3: (Have, (_MID, _Field("index", lambda v: _int(v, 0, MAX_PIECES - 1, "piece index")))),
    4: (Interested, (_MID,)),
    5: (NotInterested, (_MID,)),
    6: (Choke, ()),
    7: (Unchoke, ()),
    8: (Keepalive, ()),
    9: (TokenRequest, ()),
    10: (Token, (_TOKEN,)),
    11: (Close, (_Field("reason", _reason),)),
    12: (GetManifest, (_MID,)),
    13: (ManifestData, (_MID, _Field("envelope", lambda v: _bin(v, 0, MAX_ENVELOPE, "manifest envelope")))),
    14: (Peers, (_MID, _Field("peers", _peer_infos, lambda ps: [[p.peer_id, list(p.addrs)] for p in ps]))),
    15: (Claim, (_MID, _Field("indices", _indices, list))),
    16: (KeyProof, (_Field("mac", lambda v: _bin(v, 32, 32, "key proof")),)),
}
_CODE_OF: Final[dict[type, int]] = {cls: code for code, (cls, _) in MESSAGES.items()}


def _to_value(msg: ControlMessage) -> list[Any]:
    code = _CODE_OF[type(msg)]
    return [code, *(f.encode(getattr(msg, f.name)) for f in MESSAGES[code][1])]


def encode_control(msg: ControlMessage) -> bytes:
    """One framed control message."""
    return encode_frame(encode_frame_payload(_to_value(msg)), MAX_CONTROL_FRAME)


def _from_value(v: Any) -> ControlMessage:
    if not isinstance(v, list) or not v:
        raise RemoteProtocolError("control message must be a non-empty array")
    code, args = v[0], v[1:]
    entry = MESSAGES.get(code) if isinstance(code, int) and not isinstance(code, bool) else None
    if entry is None:
        raise RemoteProtocolError(f"unknown control message type {code!r}")
    cls, fields = entry
    if len(args) != len(fields):
        raise RemoteProtocolError(f"control message {code} has {len(args)} fields, not {len(fields)}")
    return cls(**{f.name: f.decode(a) for f, a in zip(fields, args, strict=True)})


def decode_control(payload: bytes) -> ControlMessage:
    """Parse one frame's payload; RemoteProtocolError for anything malformed."""
    return _from_value(decode_frame_payload(payload, _LIMITS))


def _our_bitfield(s: ManifestState) -> Bitfield:
    """The bitfield of a state we are about to send; ours to get right (LocalProtocolError)."""
    try:
        return Bitfield.from_bytes(s.bitfield, s.piece_count)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"cannot send this manifest state: {exc}") from exc


@dataclass(slots=True)
class _Side:
    phase: Phase = Phase.IDLE
    manifests: dict[bytes, Bitfield] = field(default_factory=dict)
    interested: set[bytes] = field(default_factory=set)
    endpoint: Endpoint | None = None
    token: bytes | None = None


class ControlConnection:
    """One end of a control stream: bytes and ``now`` in, messages and bytes out.

    ``ours`` mirrors what we told the peer; ``theirs`` what the peer told us,
    including its bitfields, kept current by every Announce and Have.
    """

    def __init__(
        self,
        now: float,
        *,
        keepalive_interval: float = 15.0,
        idle_timeout: float = 45.0,
        handshake_timeout: float = 10.0,
        max_manifests: int = 256,
        max_bitfield_bytes: int = 4 * 1024 * 1024,
        key_proof: tuple[bytes, bytes] | None = None,
    ) -> None:
        # A private swarm: (our proof, the proof we expect) from swarm_key_proof.
        self._key_proof = key_proof
        self._proof_sent = False
        self.proven = key_proof is None  # the peer proved the swarm key (or none is needed)
        self.max_manifests = max_manifests
        self.max_bitfield_bytes = max_bitfield_bytes
        self._their_bits = 0  # bytes of the bitfields the peer announced, as we keep them
        self.ours = _Side()
        self.theirs = _Side()
        self.keepalive_interval = keepalive_interval
        self.idle_timeout = idle_timeout
        self._started = now
        self._handshake_timeout = handshake_timeout
        self._last_sent = now
        self._last_recv = now
        self._decoder = FrameDecoder(MAX_CONTROL_FRAME)

    # -- sending ---------------------------------------------------------
    def send(self, msg: ControlMessage, now: float) -> bytes:
        """Bytes to write for ``msg``; LocalProtocolError if it is not allowed now."""
        side = self.ours
        nxt = TRANSITIONS.get((side.phase, type(msg)))
        if nxt is None:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} in phase {side.phase.value}")
        if isinstance(msg, KeyProof):
            if self._key_proof is None or self._proof_sent:
                raise LocalProtocolError("KeyProof only with a swarm key, first and once")
            self._proof_sent = True
        elif self._key_proof is not None and not isinstance(msg, Close) and not (self._proof_sent and self.proven):
            raise LocalProtocolError(f"cannot send {type(msg).__name__} before both sides proved the swarm key")
        self._apply_ours(msg)
        data = encode_control(msg)
        side.phase = nxt
        self._last_sent = now
        return data

    def _apply_ours(self, msg: ControlMessage) -> None:
        side = self.ours
        match msg:
            case Hello():
                side.manifests.update({s.manifest_id: _our_bitfield(s) for s in msg.manifests})
            case Announce():
                side.manifests[msg.state.manifest_id] = _our_bitfield(msg.state)
            case Have():
                bf = side.manifests.get(msg.manifest_id)
                if bf is None or msg.index >= bf.size:
                    raise LocalProtocolError("Have for a manifest or piece we never announced")
                bf.add(msg.index)
            case Claim():
                if not 1 <= len(msg.indices) <= MAX_CLAIM:
                    raise LocalProtocolError(f"a Claim names 1..{MAX_CLAIM} pieces")
                bf = side.manifests.get(msg.manifest_id)
                if bf is None or max(msg.indices) >= bf.size:
                    raise LocalProtocolError("Claim for a manifest or piece we never announced")
            case Interested():
                if msg.manifest_id not in self.theirs.manifests:
                    raise LocalProtocolError("interest in a manifest the peer never announced")
                side.interested.add(msg.manifest_id)
            case NotInterested():
                side.interested.discard(msg.manifest_id)
            case _:
                pass

    # -- receiving -------------------------------------------------------
    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the stream; ``b""`` means it ended."""
        self._last_recv = now
        self._decoder.receive_data(data)

    def next_event(self) -> ControlMessage | NeedData:
        """The next message from the peer, NEED_DATA, or RemoteProtocolError.

        A stream that ends without Close yields ``Close("end of stream")``.
        """
        payload = self.next_payload()
        if not isinstance(payload, bytes):
            return payload
        return self.accept(decode_control(payload))

    def next_payload(self) -> bytes | NeedData | Close:
        """The next frame's payload, undecoded (a caller may decode it elsewhere, then :meth:`accept` it).

        ``next_event()`` is ``accept(decode_control(next_payload()))``.
        """
        side = self.theirs
        if side.phase is Phase.CLOSED:
            if self._decoder.buffered:
                raise RemoteProtocolError("peer sent data after Close")
            return NEED_DATA
        payload = self._decoder.next_frame()
        if isinstance(payload, NeedData):
            if self._decoder.eof:
                side.phase = Phase.CLOSED
                return Close("end of stream")
            return payload
        return payload

    def accept(self, msg: ControlMessage) -> ControlMessage:
        """Apply a message decoded from :meth:`next_payload`'s payload; RemoteProtocolError if not allowed now."""
        side = self.theirs
        nxt = TRANSITIONS.get((side.phase, type(msg)))
        if nxt is None:
            raise RemoteProtocolError(f"peer sent {type(msg).__name__} in phase {side.phase.value}")
        self._check_proof(msg)
        self._apply_theirs(msg)
        side.phase = nxt
        return msg

    def _check_proof(self, msg: ControlMessage) -> None:
        """In a private swarm the first message must be a valid KeyProof; elsewhere there is none."""
        if isinstance(msg, KeyProof):
            if self._key_proof is None:
                raise RemoteProtocolError("peer requires a swarm key; this node has none")
            if self.proven:
                raise RemoteProtocolError("peer sent KeyProof twice")
            if not hmac.compare_digest(msg.mac, self._key_proof[1]):
                raise RemoteProtocolError("peer does not hold this swarm's key")
            self.proven = True
        elif not self.proven and not isinstance(msg, Close):
            raise RemoteProtocolError(f"peer sent {type(msg).__name__} before proving the swarm key")

    def _apply_theirs(self, msg: ControlMessage) -> None:
        side = self.theirs
        match msg:
            case Hello():
                if msg.version != CONTROL_VERSION:
                    raise RemoteProtocolError(f"peer speaks control version {msg.version}, we speak {CONTROL_VERSION}")
                side.endpoint, side.token = msg.endpoint, msg.token
                for s in msg.manifests:
                    self._keep_theirs(s)
            case Announce():
                self._keep_theirs(msg.state)
            case Have():
                bf = side.manifests.get(msg.manifest_id)
                if bf is None or msg.index >= bf.size:
                    raise RemoteProtocolError("peer sent Have for a manifest or piece it never announced")
                bf.add(msg.index)
            case Claim():
                bf = side.manifests.get(msg.manifest_id)
                if bf is None or max(msg.indices) >= bf.size:
                    raise RemoteProtocolError("peer sent Claim for a manifest or piece it never announced")
            case Interested():
                if msg.manifest_id not in self.ours.manifests:
                    raise RemoteProtocolError("peer is interested in a manifest we never announced")
                side.interested.add(msg.manifest_id)
            case NotInterested():
                side.interested.discard(msg.manifest_id)
            case Token():
                side.token = msg.token
            case _:
                pass

    def _keep_theirs(self, s: ManifestState) -> None:
        """Keep a manifest the peer announced, within its budget (manifests, bitfield bytes)."""
        side = self.theirs
        old = side.manifests.get(s.manifest_id)
        bits = self._their_bits - (0 if old is None else (old.size + 7) // 8) + (s.piece_count + 7) // 8
        if old is None and len(side.manifests) >= self.max_manifests:
            raise RemoteProtocolError(f"peer announced more than {self.max_manifests} manifests")
        if bits > self.max_bitfield_bytes:
            raise RemoteProtocolError(f"peer announced more than {self.max_bitfield_bytes} bytes of bitfields")
        side.manifests[s.manifest_id] = Bitfield.from_bytes(s.bitfield, s.piece_count)
        self._their_bits = bits

    # -- time ------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` next has work, or None once closed."""
        if self.ours.phase is Phase.CLOSED or self.theirs.phase is Phase.CLOSED:
            return None
        t = self._last_recv + self.idle_timeout
        if self.theirs.phase is Phase.IDLE:
            t = min(t, self._started + self._handshake_timeout)
        if self.ours.phase in _OPEN:
            t = min(t, self._last_sent + self.keepalive_interval)
        return t

    def handle_timer(self, now: float) -> bytes:
        """Bytes to send (a Keepalive) or b""; RemoteProtocolError if the peer went silent."""
        if self.next_deadline() is None:
            return b""
        if self.theirs.phase is Phase.IDLE and now >= self._started + self._handshake_timeout:
            raise RemoteProtocolError("peer sent no Hello in time")
        if now >= self._last_recv + self.idle_timeout:
            raise RemoteProtocolError(f"peer silent for {now - self._last_recv:.0f} s")
        if self.ours.phase in _OPEN and now >= self._last_sent + self.keepalive_interval:
            return self.send(Keepalive(), now)
        return b""
