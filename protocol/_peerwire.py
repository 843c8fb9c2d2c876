"""Peerwire: the bulk piece protocol over a plain TCP connection, sans-IO.

Theory of operation
-------------------
The client opens a TCP connection to the endpoint a peer gave in its control
``Hello`` and sends ``Auth`` with the one-time token from that Hello (or a
later control ``Token``). The server answers ``Welcome`` or a ``Reject`` with
request id 0 and closes. After Welcome the client pipelines ``Request``s for
whole pieces, by manifest id and global piece index; the server answers each,
in any order, with a ``Piece`` header frame followed by exactly ``length`` raw
bytes (so the node can send them with ``os.sendfile``) or with a ``Reject``.

A payload is the piece itself (codec 0) or its zstd compression (codec 1),
which a server uses only when the client accepts it and it is strictly
smaller. The client knows each piece's length and hash from the signed
manifest, so a payload longer than the piece, a decompressed size that
differs, or an unknown request id is a RemoteProtocolError, and a hash that
differs (checked by :func:`verify_piece`) is an IntegrityError.

Every message but the raw payload is a length-prefixed msgpack frame of at
most :data:`MAX_HEADER_FRAME` bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import blake3
import zstandard

from ._codec import Limits, decode_frame_payload, encode_frame_payload
from ._errors import IntegrityError, LocalProtocolError, RemoteProtocolError
from ._frames import NEED_DATA, FrameDecoder, NeedData, encode_frame

__all__ = [
    "MAX_INFLIGHT",
    "Auth",
    "Cancel",
    "Codec",
    "PeerwireClient",
    "PeerwireServer",
    "PieceHeader",
    "PieceReceived",
    "RejectReason",
    "Rejected",
    "Request",
    "Welcome",
    "maybe_compress",
    "verify_piece",
]

PEERWIRE_VERSION: Final = 1
MAX_HEADER_FRAME: Final = 4096
MAX_INFLIGHT: Final = 256
_LIMITS: Final = Limits(max_bytes=MAX_HEADER_FRAME, max_str_len=256, max_bin_len=64, max_array_len=8, max_map_len=0)
_U32: Final = 2**32 - 1
_MIN_WINDOW_LOG: Final = 23  # 8 MiB: what zstd level 19 uses for a frame of unknown size


class Codec(enum.IntEnum):
    RAW = 0
    ZSTD = 1


class RejectReason(enum.IntEnum):
    BAD_TOKEN = 1
    NOT_HAVE = 2
    CHOKED = 3
    UNKNOWN_MANIFEST = 4
    # 5 is reserved (it was BUSY, which no node ever sent): never reuse it.
    BANNED = 6
    CANCELLED = 7


@dataclass(frozen=True, slots=True)
class Auth:
    token: bytes
    version: int = PEERWIRE_VERSION


@dataclass(frozen=True, slots=True)
class Request:
    req_id: int
    manifest_id: bytes
    index: int
    accept_zstd: bool = True


@dataclass(frozen=True, slots=True)
class Cancel:
    req_id: int


@dataclass(frozen=True, slots=True)
class Welcome:
    pass


@dataclass(frozen=True, slots=True)
class PieceHeader:
    req_id: int
    codec: Codec
    length: int


@dataclass(frozen=True, slots=True)
class Rejected:
    req_id: int
    reason: RejectReason
    manifest_id: bytes = b""
    index: int = -1


@dataclass(frozen=True, slots=True)
class PieceReceived:
    """A whole piece, decompressed and length-checked; its hash is not yet checked."""

    req_id: int
    manifest_id: bytes
    index: int
    data: bytes | bytearray | memoryview
    wire_bytes: int


_CLIENT_CODES: Final = {Auth: 1, Request: 2, Cancel: 3}
_SERVER_CODES: Final = {Welcome: 16, PieceHeader: 17, Rejected: 18}


def _frame(value: list[Any]) -> bytes:
    return encode_frame(encode_frame_payload(value), MAX_HEADER_FRAME)


def _int(v: Any, hi: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise RemoteProtocolError(f"{what} must be an integer in 0..{hi}")
    return v


def _decode(payload: bytes, codes: dict[type, int]) -> list[Any]:
    v = decode_frame_payload(payload, _LIMITS)
    if not isinstance(v, list) or not v or v[0] not in codes.values() or isinstance(v[0], bool):
        raise RemoteProtocolError("unknown peerwire message")
    return v


def verify_piece(data: bytes, expected: bytes) -> None:
    """IntegrityError unless BLAKE3(data) is ``expected``."""
    if blake3.blake3(data).digest() != expected:
        raise IntegrityError("piece hash does not match the manifest")


def maybe_compress(data: bytes, level: int = 3) -> tuple[Codec, bytes]:
    """zstd only when it shrinks the piece.

    Strategy: weights rarely compress, so a 64 KiB probe decides first and
    incompressible pieces cost one small compression, not a whole one.
    """
    if len(data) < 512:
        return Codec.RAW, data
    cctx = zstandard.ZstdCompressor(level=level)
    probe = data[: 64 * 1024]
    if len(cctx.compress(probe)) > len(probe) * 0.9:
        return Codec.RAW, data
    packed = cctx.compress(data)
    return (Codec.ZSTD, packed) if len(packed) < len(data) else (Codec.RAW, data)


def _decompress_piece(raw: bytes, length: int) -> bytes:
    """One zstd frame that must expand to exactly ``length`` bytes (the signed piece length).

    Strategy: the sender chooses the frame header, so nothing it claims sizes
    an allocation. zstandard allocates a frame's declared content size up
    front (``max_output_size`` only applies to frames that declare none), so
    a declared size other than ``length`` is refused before decoding, and the
    window the decoder may allocate is capped (8 MiB, or the piece length if larger).
    """
    try:
        params = zstandard.get_frame_parameters(raw)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"bad zstd frame header: {exc}") from exc
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and params.content_size != length:
        raise RemoteProtocolError(f"zstd frame declares {params.content_size} bytes for a piece of {length}")
    window = 1 << max(_MIN_WINDOW_LOG, (length - 1).bit_length())
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=window)
        data = dctx.decompress(raw, max_output_size=length)
    except (zstandard.ZstdError, MemoryError) as exc:
        raise RemoteProtocolError(f"bad zstd payload: {exc!r}") from exc
    if len(data) != length:
        raise RemoteProtocolError("decompressed piece has the wrong length")
    return data


@dataclass(slots=True)
class _Pending:
    manifest_id: bytes
    index: int
    length: int


class PeerwireClient:
    """The requesting end. Call :meth:`auth` first, then :meth:`request` freely."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder(MAX_HEADER_FRAME)
        self._pending: dict[int, _Pending] = {}
        self._body: tuple[PieceHeader, _Pending] | None = None
        self._authed = False
        self._sent_auth = False
        self._into: bytearray | memoryview | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def auth(self, token: bytes) -> bytes:
        if self._sent_auth:
            raise LocalProtocolError("Auth is sent once")
        self._sent_auth = True
        return _frame([_CLIENT_CODES[Auth], PEERWIRE_VERSION, token])

    def request(self, req_id: int, manifest_id: bytes, index: int, length: int, accept_zstd: bool = True) -> bytes:
        if not self._sent_auth or req_id in self._pending or not 0 < req_id <= _U32:
            raise LocalProtocolError("request before Auth or with a reused id")
        if len(self._pending) >= MAX_INFLIGHT:
            raise LocalProtocolError(f"more than {MAX_INFLIGHT} requests in flight")
        self._pending[req_id] = _Pending(manifest_id, index, length)
        return _frame([_CLIENT_CODES[Request], req_id, manifest_id, index, accept_zstd])

    def cancel(self, req_id: int) -> bytes:
        """Ask the server to drop a request. It still answers: Reject(CANCELLED) or the piece."""
        if req_id not in self._pending:
            return b""
        return _frame([_CLIENT_CODES[Cancel], req_id])

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def next_event(self) -> Welcome | PieceReceived | Rejected | NeedData:
        if self._into is not None:
            raise LocalProtocolError("a payload is being received with start_body_into()")
        if self._body is not None:
            return self._finish_body()
        payload = self._decoder.next_frame()
        if isinstance(payload, NeedData):
            if self._decoder.eof:
                raise RemoteProtocolError("peer closed the peerwire connection")
            return payload
        v = _decode(payload, _SERVER_CODES)
        code = v[0]
        if code == _SERVER_CODES[Welcome]:
            if len(v) != 1 or self._authed:
                raise RemoteProtocolError("unexpected Welcome")
            self._authed = True
            return Welcome()
        if code == _SERVER_CODES[Rejected]:
            if len(v) != 3:
                raise RemoteProtocolError("malformed Reject")
            req_id, reason = _int(v[1], _U32, "request id"), _int(v[2], 255, "reason")
            try:
                why = RejectReason(reason)
            except ValueError:
                raise RemoteProtocolError(f"unknown reject reason {reason}") from None
            if req_id == 0:
                return Rejected(0, why)
            p = self._take(req_id)
            return Rejected(req_id, why, p.manifest_id, p.index)
        if len(v) != 4:
            raise RemoteProtocolError("malformed Piece header")
        req_id, codec, length = _int(v[1], _U32, "request id"), _int(v[2], 1, "codec"), _int(v[3], _U32, "length")
        p = self._take(req_id)
        if length > p.length or (codec == Codec.RAW and length != p.length):
            raise RemoteProtocolError(f"piece payload of {length} bytes for a piece of {p.length}")
        self._body = (PieceHeader(req_id, Codec(codec), length), p)
        return self._finish_body()

    def _take(self, req_id: int) -> _Pending:
        p = self._pending.pop(req_id, None)
        if p is None:
            raise RemoteProtocolError(f"answer to request {req_id}, which is not in flight")
        return p

    def _finish_body(self) -> PieceReceived | NeedData:
        assert self._body is not None
        hdr, p = self._body
        raw = self._decoder.next_raw(hdr.length)
        if isinstance(raw, NeedData):
            return raw
        self._body = None
        data = raw
        if hdr.codec is Codec.ZSTD:
            data = _decompress_piece(raw, p.length)
        return PieceReceived(hdr.req_id, p.manifest_id, p.index, data, hdr.length)

    def start_body_into(
        self, alloc: Callable[[int], bytearray | memoryview] = bytearray
    ) -> tuple[bytearray | memoryview, int] | None:
        """Zero-copy receive of a raw payload: the buffer to fill and how much of it is filled.

        Only while a raw (uncompressed) payload is owed. The caller fills the
        rest of the buffer straight from the socket (``recv_into``) and then
        calls :meth:`body_filled`; no other bytes may be fed in between.
        ``alloc(n)`` makes the buffer (the IO layer may skip zero-filling
        memory it overwrites anyway).
        """
        if self._body is None or self._body[0].codec is not Codec.RAW:
            return None
        hdr = self._body[0]
        buf = alloc(hdr.length)
        if len(buf) != hdr.length:
            raise LocalProtocolError(f"alloc({hdr.length}) returned {len(buf)} bytes")
        have = self._decoder.take_buffered(hdr.length)
        buf[: len(have)] = have
        self._into = buf
        return buf, len(have)

    def body_filled(self) -> PieceReceived:
        """The buffer from :meth:`start_body_into` is full: the piece (hash not yet checked)."""
        if self._body is None or self._into is None:
            raise LocalProtocolError("body_filled() without start_body_into()")
        hdr, p = self._body
        data, self._body, self._into = self._into, None, None
        return PieceReceived(hdr.req_id, p.manifest_id, p.index, data, hdr.length)

    @property
    def body_req_id(self) -> int | None:
        """The request whose payload is being received (None between frames)."""
        return None if self._body is None else self._body[0].req_id

    @property
    def body_remaining(self) -> int:
        """Bytes still owed for the payload being received (0 between frames)."""
        return 0 if self._body is None else max(0, self._body[0].length - self._decoder.buffered)


class _ServerPhase(enum.Enum):
    AWAIT_AUTH = "await-auth"
    AUTHING = "authing"
    OPEN = "open"
    CLOSED = "closed"


class PeerwireServer:
    """The serving end: yields Auth, then Requests and Cancels; encodes answers."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder(MAX_HEADER_FRAME)
        self._phase = _ServerPhase.AWAIT_AUTH
        # Request ids asked and not yet answered: at most MAX_INFLIGHT, and the
        # only ids a Cancel may name, so a client's Cancels cost no state.
        self._open: set[int] = set()
        self._cancelled: set[int] = set()

    @property
    def queued(self) -> int:
        return len(self._open)

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def next_event(self) -> Auth | Request | Cancel | NeedData:
        """The next client message; ``NEED_DATA`` also at a clean end of stream (check ``eof``).

        A Cancel is passed on once, and only for a request that is still open:
        one that crosses its answer, or names an id never asked, is dropped.
        """
        while True:
            ev = self._next()
            if not isinstance(ev, Cancel):
                return ev
            if ev.req_id in self._open and ev.req_id not in self._cancelled:
                self._cancelled.add(ev.req_id)
                return ev

    def _next(self) -> Auth | Request | Cancel | NeedData:
        if self._phase in (_ServerPhase.AUTHING, _ServerPhase.CLOSED):
            return NEED_DATA
        payload = self._decoder.next_frame()
        if isinstance(payload, NeedData):
            return payload
        v = _decode(payload, _CLIENT_CODES)
        code = v[0]
        if code == _CLIENT_CODES[Auth]:
            if self._phase is not _ServerPhase.AWAIT_AUTH or len(v) != 3 or not isinstance(v[2], bytes):
                raise RemoteProtocolError("unexpected or malformed Auth")
            self._phase = _ServerPhase.AUTHING
            return Auth(v[2], _int(v[1], _U32, "version"))
        if self._phase is not _ServerPhase.OPEN:
            raise RemoteProtocolError("request before Auth")
        if code == _CLIENT_CODES[Cancel]:
            if len(v) != 2:
                raise RemoteProtocolError("malformed Cancel")
            return Cancel(_int(v[1], _U32, "request id"))
        if len(v) != 5 or not isinstance(v[2], bytes) or len(v[2]) != 32 or not isinstance(v[4], bool):
            raise RemoteProtocolError("malformed Request")
        if len(self._open) >= MAX_INFLIGHT:
            raise RemoteProtocolError(f"client has more than {MAX_INFLIGHT} requests in flight")
        req_id = _int(v[1], _U32, "request id")
        if req_id == 0:
            raise RemoteProtocolError("request id 0 is reserved")
        if req_id in self._open:
            raise RemoteProtocolError(f"request id {req_id} is already in flight")
        self._open.add(req_id)
        return Request(req_id, v[2], _int(v[3], _U32, "piece index"), v[4])

    @property
    def eof(self) -> bool:
        return self._decoder.eof

    def accept(self) -> bytes:
        if self._phase is not _ServerPhase.AUTHING:
            raise LocalProtocolError("accept() answers an Auth")
        self._phase = _ServerPhase.OPEN
        return _frame([_SERVER_CODES[Welcome]])

    def refuse(self, reason: RejectReason = RejectReason.BAD_TOKEN) -> bytes:
        self._phase = _ServerPhase.CLOSED
        return _frame([_SERVER_CODES[Rejected], 0, int(reason)])

    def piece_header(self, req_id: int, codec: Codec, length: int) -> bytes:
        """The frame before a payload; the caller then sends exactly ``length`` bytes."""
        self._answered(req_id)
        return _frame([_SERVER_CODES[PieceHeader], req_id, int(codec), length])

    def reject(self, req_id: int, reason: RejectReason) -> bytes:
        self._answered(req_id)
        return _frame([_SERVER_CODES[Rejected], req_id, int(reason)])

    def _answered(self, req_id: int) -> None:
        self._open.discard(req_id)
        self._cancelled.discard(req_id)
