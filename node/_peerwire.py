"""Peerwire over TCP: the bulk piece transport between nodes.

The server listens on 127.0.0.1 by default. A connection is served only
after it presents a one-time token that the swarm issued over the
Noise-authenticated control stream; the token binds the connection to that
peer, so choking, bans and fair sharing apply per peer. A piece this process
hash-checked and wrote itself goes out with ``os.sendfile``; any other piece
(a file that was on disk before) is read and its BLAKE3 hash checked before
its first serve, and later serves of the unchanged file region use
``os.sendfile`` too. Served ranges leave the page cache once no peer asked
for them again for a few seconds (drop-behind, node/_store.py, kept a little
for the next peer: node/_dropbehind.py). The client pipelines requests on one connection and returns
whole, length-checked pieces; the caller verifies the hash (the sink does).
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import secrets
import select
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, NoReturn, Protocol

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from autoglm.node._dropbehind import RecentlyServed
from autoglm.node._lowat import LowWater
from autoglm.node._ratelimit import RateLimiter
from autoglm.node._staging import DIRECT_ALIGN
from autoglm.node._store import PieceLocation, drop_cache
from autoglm.node.errors import AutoglmError, IntegrityError, RemoteProtocolError, SourceError
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._peerwire import (
    MAX_INFLIGHT,
    Auth,
    Cancel,
    Codec,
    PeerwireClient,
    PeerwireServer,
    PieceReceived,
    Rejected,
    RejectReason,
    Request,
    Welcome,
    maybe_compress,
    verify_piece,
)

if TYPE_CHECKING:
    # trio_typing's stubs (pulled in by libp2p) shadow trio's own types for mypy.
    from trio_typing import TaskStatus

__all__ = [
    "PeerRejected",
    "PeerStalled",
    "PeerwireConnection",
    "PieceLocation",
    "AeadStream",
    "PieceLocator",
    "ServeGrant",
    "connect_peerwire",
    "derive_keys",
    "handshake_peerwire",
    "new_token",
    "open_peerwire_connection",
    "serve_peerwire",
]

log = logging.getLogger(__name__)

_RECV = 1 << 20
#: With requests in flight and no byte for this long, the connection counts as broken.
STALL_TIMEOUT = 15.0


_RELOCATE_TRIES = 20  # x 10 ms: the rename-then-record window of a finishing file

#: Payloads at least this large still owed are read with recv_into (see _receive_body_direct).
_DIRECT_MIN = 64 * 1024
#: The piece channel's highest SO_RCVLOWAT (node/_lowat.py): ~25 ms at 40 MB/s, 8 wake-ups per 8 MiB piece
#: at most. Linux grows the receive buffer to fit a mark (tcp_set_rcvlowat), up to tcp_rmem's maximum.
_LOWAT_MAX = 1 << 20


def _uninitialised(n: int) -> bytearray:
    """A bytearray of ``n`` bytes whose contents are left as malloc returned them.

    Strategy: ``bytearray(n)`` zero-fills, ~0.1 CPU-s per GiB received in 8 MiB
    pieces, for memory that ``recv_into`` overwrites at once; CPython's
    ``PyByteArray_FromStringAndSize(NULL, n)`` skips the fill. The buffer is
    handed out only after every byte came from the socket (body_filled), so
    old heap contents never leave the connection. Elsewhere than CPython:
    ``bytearray(n)``.
    """
    return _FROM_NULL(None, n) if _FROM_NULL is not None else bytearray(n)


def _page_aligned(n: int, at: int = 0) -> memoryview:
    """``n`` uninitialised bytes (as :func:`_uninitialised`) placed to line up with file offset ``at``.

    The view's address is ``at`` modulo DIRECT_ALIGN, so once the payload
    lands the store writes its 4 KiB-aligned span with ``O_DIRECT`` straight
    from this memory (node/_staging.py); an unaligned buffer is copied into
    an aligned bounce buffer first (~0.1-0.15 CPU-s per GiB received). Pieces
    start where the model's files put them (a safetensors header, then
    tensors), not on 4 KiB, hence the offset. glibc's malloc returns 16-byte
    alignment only: one page more, and a view from the right place.
    """
    raw = _uninitialised(n + DIRECT_ALIGN)
    view = memoryview(raw)
    if not n:
        return view[:0]
    import ctypes

    shift = (at - ctypes.addressof(ctypes.c_char.from_buffer(raw))) % DIRECT_ALIGN
    return view[shift : shift + n]


def _from_null() -> Callable[[None, int], bytearray] | None:
    if sys.implementation.name != "cpython":
        return None
    import ctypes

    f = ctypes.pythonapi.PyByteArray_FromStringAndSize
    f.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    f.restype = ctypes.py_object  # a new reference; MemoryError is raised as such
    return f


_FROM_NULL = _from_null()


class PeerStalled(SourceError):
    """The peer sent nothing for ``STALL_TIMEOUT`` with requests in flight."""


def _stalled() -> NoReturn:
    # A peer that takes requests and never answers must not hold pieces hostage.
    raise PeerStalled(f"peer sent nothing for {STALL_TIMEOUT:.0f} s with requests in flight")


class PeerRejected(SourceError):
    """The peer answered a request with Reject."""

    def __init__(self, reason: RejectReason) -> None:
        super().__init__(f"peer refused the request: {reason.name}")
        self.reason = reason


class PieceLocator(Protocol):
    def locate(self, manifest_id: bytes, index: int) -> PieceLocation | None:
        """Where a verified piece lies, or None if this node does not hold it."""
        ...


class ServeGrant(Protocol):
    """What a redeemed token stands for: one peer, asking under the swarm's rules."""

    @property
    def peer_id(self) -> str: ...

    def check(self, manifest_id: bytes, index: int) -> RejectReason | None:
        """None when this peer may have this piece now, else why not."""
        ...

    def served(self, manifest_id: bytes, index: int, nbytes: int) -> None:
        """Count bytes sent to this peer."""
        ...

    def release(self) -> None:
        """The connection this grant opened has ended (the grantor counts open connections per peer)."""
        ...


Redeem = Callable[[bytes], ServeGrant | None]


def new_token() -> bytes:
    return secrets.token_bytes(32)


_RECORD_MAX = 1 << 20
_TAG = 16


def derive_keys(psk: bytes, token: bytes) -> tuple[bytes, bytes]:
    """(client-to-server, server-to-client) keys for one connection of a private swarm."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=token, info=b"autoglm-node/peerwire/v1").derive(psk)
    return okm[:32], okm[32:]


class AeadStream:
    """A stream whose bytes travel sealed with ChaCha20-Poly1305 (private swarms).

    Each ``send_all`` is cut into records of at most 1 MiB: a 4-byte length,
    then the ciphertext and tag; the nonce is a per-direction record counter,
    so a record cannot be replayed, reordered or dropped unnoticed.
    """

    def __init__(self, stream: trio.SocketStream, send_key: bytes, recv_key: bytes) -> None:
        self._stream = stream
        self._seal = ChaCha20Poly1305(send_key)
        self._open = ChaCha20Poly1305(recv_key)
        self._send_n = 0
        self._recv_n = 0
        self._raw = bytearray()
        self._plain = bytearray()

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        out = []
        for pos in range(0, len(view), _RECORD_MAX):
            nonce = self._send_n.to_bytes(12, "big")
            self._send_n += 1
            ct = self._seal.encrypt(nonce, bytes(view[pos : pos + _RECORD_MAX]), None)
            out.append(len(ct).to_bytes(4, "big") + ct)
        await self._stream.send_all(b"".join(out))

    async def receive_some(self, max_bytes: int = _RECV) -> bytes:
        while not self._plain:
            if len(self._raw) >= 4:
                n = int.from_bytes(self._raw[:4], "big")
                if not _TAG <= n <= _RECORD_MAX + _TAG:
                    raise RemoteProtocolError(f"sealed record of {n} bytes")
                if len(self._raw) >= 4 + n:
                    nonce = self._recv_n.to_bytes(12, "big")
                    self._recv_n += 1
                    try:
                        self._plain += self._open.decrypt(nonce, bytes(self._raw[4 : 4 + n]), None)
                    except InvalidTag as exc:
                        raise RemoteProtocolError("sealed record does not authenticate (wrong swarm key?)") from exc
                    del self._raw[: 4 + n]
                    continue
            chunk = await self._stream.receive_some(_RECV)
            if not chunk:
                if self._raw:
                    raise RemoteProtocolError("stream ended inside a sealed record")
                return b""
            self._raw += chunk
        out = bytes(self._plain[:max_bytes])
        del self._plain[:max_bytes]
        return out

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclass(slots=True)
class _ServeState:
    locator: PieceLocator
    redeem: Redeem
    up: RateLimiter
    psk: bytes | None = None
    idle_timeout: float = 120.0  # an authenticated connection with nothing in flight is closed after this
    # (path, offset, length) -> (st_ino, st_mtime_ns, st_size) when it last verified.
    verified: dict[tuple[os.PathLike[str], int, int], tuple[int, int, int]] = field(default_factory=dict)


#: Threads that may be sending files at once; the store's own worker threads stay free whatever
#: the peers do. A thread is held only while the socket takes bytes: a peer that reads slowly
#: waits on the event loop, so slow readers cannot hold every thread (docs/security.md).
_SEND_THREADS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("peerwire_send_threads")
_POLL_MS = 200  # a sending thread waits this long for room in the socket, then gives itself back
#: The serving server's recently sent ranges (node/_dropbehind.py), seen by the tasks it starts;
#: unset (a bare ``_sendfile``): each range is dropped as soon as it went out.
_SERVED: contextvars.ContextVar[RecentlyServed] = contextvars.ContextVar("peerwire_recently_served")


def _send_some(sockfd: int, fd: int, offset: int, count: int, gate: _SendGate) -> int:
    """Runs in a worker thread: ``sendfile`` from the range until it is sent, or the socket stays full.

    Returns the bytes sent. Waits with ``poll`` up to ``_POLL_MS`` for room in
    the socket's buffer, then returns so the caller waits on the event loop
    holding no thread. Stops when the caller was cancelled (``gate``); the
    fds (the caller's duplicates) are then this thread's to close.
    """
    if not gate.take():
        return 0
    sent = 0
    try:
        poller = select.poll()
        poller.register(sockfd, select.POLLOUT)
        while sent < count and not gate.stop:
            try:
                n = os.sendfile(sockfd, fd, offset + sent, count - sent)
            except BlockingIOError:
                if poller.poll(_POLL_MS):
                    continue
                break
            if n == 0:
                raise trio.BrokenResourceError("peer closed during sendfile")
            sent += n
        return sent
    finally:
        if gate.finish():
            os.close(sockfd)
            os.close(fd)


class _SendGate:
    """Who closes a send's fd duplicates: the caller, unless it gave up while a thread was running."""

    __slots__ = ("_lock", "_running", "stop")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = False
        self.stop = False

    def take(self) -> bool:
        """A thread starts; False if the caller already gave up (then the caller closes)."""
        with self._lock:
            self._running = not self.stop
            return self._running

    def finish(self) -> bool:
        """A thread ends; True when the caller gave up meanwhile (the thread closes the fds)."""
        with self._lock:
            self._running = False
            return self.stop

    def give_up(self) -> bool:
        """Tell a running thread to stop; True if none is running (the caller closes the fds)."""
        with self._lock:
            self.stop = True
            return not self._running


async def _sendfile(sock: trio.socket.SocketType, fd: int, offset: int, count: int) -> None:
    """Send a file range on the socket and drop it from the page cache, off the event loop.

    Strategy: on the event loop, a piece went out in ~8 sendfile calls with a
    wake-up between each, and a cold read blocked every other task on the
    disk; a worker thread's own poll loop costs less (bench/cost_bench.py).
    The thread gets duplicates of both fds: if the caller is cancelled it
    returns at once (the thread stops within ``_POLL_MS``), and closing the
    stream meanwhile cannot hand its fd number to another socket mid-send.
    When the socket stays full the thread is given back and this task waits
    for room on the event loop; a peer that takes no byte for
    ``STALL_TIMEOUT`` breaks the send.
    """
    sockfd = os.dup(sock.fileno())
    try:
        filefd = os.dup(fd)
    except BaseException:
        os.close(sockfd)
        raise
    gate = _SendGate()
    mine = True  # whether this task closes the duplicates
    try:
        limiter = _SEND_THREADS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(8)
        _SEND_THREADS.set(limiter)
    start, length = offset, count
    last = trio.current_time()
    try:
        while count:
            # trio_typing's stubs (pulled in by libp2p) predate abandon_on_cancel
            n = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                _send_some, sockfd, filefd, offset, count, gate, abandon_on_cancel=True, limiter=limiter
            )
            if n:
                offset, count, last = offset + n, count - n, trio.current_time()
            if count:
                with trio.move_on_at(last + STALL_TIMEOUT) as waited:
                    await trio.lowlevel.wait_writable(sock.fileno())
                if waited.cancelled_caught:
                    raise trio.BrokenResourceError(f"peer took nothing for {STALL_TIMEOUT:.0f} s")
        served = _SERVED.get(None)
        if served is None:
            drop_cache(filefd, start, length)
        else:
            served.sent(filefd, start, length)  # kept a while for the next peer that asks (it dups the fd)
    except BaseException:
        mine = gate.give_up()
        raise
    finally:
        if mine:
            os.close(sockfd)
            os.close(filefd)


def _open_located(st: _ServeState, manifest_id: bytes, index: int) -> tuple[PieceLocation, int] | None:
    # A finished file is renamed from staging into place and then recorded:
    # for a few milliseconds the store still names a path that is gone. Look
    # again rather than refuse (a refusal makes the peer forget that we have
    # the piece, which strands it when we are its only holder).
    for attempt in range(_RELOCATE_TRIES):
        loc = st.locator.locate(manifest_id, index)
        if loc is None:
            return None
        try:
            # never through a symlink planted where our file was (docs/security.md)
            return loc, os.open(loc.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if attempt == _RELOCATE_TRIES - 1:
                raise
            time.sleep(0.01)
    return None


def _locate_and_read(st: _ServeState, manifest_id: bytes, index: int) -> tuple[PieceLocation, int, bytes | None] | None:
    """Runs in a worker thread (the store is blocking).

    Returns None when the piece is not here, else (location, fd, data): an fd
    open on the file (the caller closes it) and either the bytes after a
    fresh hash check or None when the region can go out by sendfile as is
    (written here, or verified before and unchanged since). Holding the fd
    from here on keeps a file that is being moved into place (staging to
    final, a rename) servable: the location is looked up again once if the
    path vanished in between.
    """
    opened = _open_located(st, manifest_id, index)
    if opened is None:
        return None
    loc, fd = opened
    try:
        key = (loc.path, loc.offset, loc.length)
        s = os.fstat(fd)
        stamp = (s.st_ino, s.st_mtime_ns, s.st_size)
        if (loc.trusted or st.verified.get(key) == stamp) and st.psk is None:
            return loc, fd, None
        data = os.pread(fd, loc.length, loc.offset)
        drop_cache(fd, loc.offset, loc.length)
        if len(data) != loc.length:
            raise IntegrityError(f"{loc.path} is shorter than the manifest says")
        verify_piece(data, loc.hash)
        st.verified[key] = stamp
        return loc, fd, data
    except BaseException:
        os.close(fd)
        raise


async def _serve_one(stream: trio.SocketStream | AeadStream, proto: PeerwireServer, st: _ServeState, grant: ServeGrant, req: Request) -> None:
    why = grant.check(req.manifest_id, req.index)
    found = None
    if why is None:
        try:
            found = await trio.to_thread.run_sync(_locate_and_read, st, req.manifest_id, req.index)
        except (OSError, AutoglmError) as exc:
            # Gone or rotted on disk: refuse it rather than serve bad bytes.
            log.warning("cannot serve piece %d: %s", req.index, exc)
    if found is None:
        await stream.send_all(proto.reject(req.req_id, why or RejectReason.NOT_HAVE))
        return
    loc, fd, data = found
    try:
        await st.up.acquire(loc.length)
        if data is not None:
            codec, body = (Codec.RAW, data)
            if req.accept_zstd:
                codec, body = await trio.to_thread.run_sync(maybe_compress, data)
            if codec is Codec.ZSTD or st.psk is not None:
                # Two writes: joining header and an 8 MiB body would copy the body once more.
                await stream.send_all(proto.piece_header(req.req_id, codec, len(body)))
                await stream.send_all(body)
                grant.served(req.manifest_id, req.index, len(body))
                return
        # Raw bytes that just verified, or trusted / verified before and unchanged
        # since: zero copy from the file.
        await stream.send_all(proto.piece_header(req.req_id, Codec.RAW, loc.length))
        await _sendfile(stream.socket, fd, loc.offset, loc.length)  # drops the range from the cache too (seconds later)
    finally:
        os.close(fd)
    grant.served(req.manifest_id, req.index, loc.length)


async def _auth(
    stream: trio.SocketStream, proto: PeerwireServer, st: _ServeState
) -> tuple[ServeGrant, trio.SocketStream | AeadStream] | None:
    """The grant for a valid token, and the stream to use from now on (sealed in a private swarm)."""
    with trio.move_on_after(10):
        while True:
            ev = proto.next_event()
            if isinstance(ev, Auth):
                grant = st.redeem(ev.token)
                if grant is None:
                    await stream.send_all(proto.refuse(RejectReason.BAD_TOKEN))
                    return None
                out: trio.SocketStream | AeadStream = stream
                if st.psk is not None:
                    c2s, s2c = derive_keys(st.psk, ev.token)
                    out = AeadStream(stream, s2c, c2s)
                await out.send_all(proto.accept())
                return grant, out
            data = await stream.receive_some(_RECV)
            if not data:
                return None
            proto.receive_data(data)
    return None


async def _serve_conn(raw: trio.SocketStream, st: _ServeState) -> None:
    proto = PeerwireServer()
    authed = await _auth(raw, proto, st)
    if authed is None:
        return
    grant, stream = authed
    try:
        await _serve_requests(stream, proto, st, grant)
    finally:
        grant.release()


async def _serve_requests(stream: trio.SocketStream | AeadStream, proto: PeerwireServer, st: _ServeState, grant: ServeGrant) -> None:
    # The protocol caps queued requests at MAX_INFLIGHT, so this never blocks.
    send, recv = trio.open_memory_channel[Request](MAX_INFLIGHT)
    # Requests received and not answered yet: a Cancel counts only for one of
    # these (at most MAX_INFLIGHT), never for an id the peer never sent.
    pending: set[int] = set()
    cancelled: set[int] = set()

    async def writer() -> None:
        async for req in recv:
            try:
                if req.req_id in cancelled:
                    await stream.send_all(proto.reject(req.req_id, RejectReason.CANCELLED))
                else:
                    await _serve_one(stream, proto, st, grant, req)
            finally:
                pending.discard(req.req_id)
                cancelled.discard(req.req_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        async with send:
            while True:
                ev = proto.next_event()
                if isinstance(ev, Request):
                    pending.add(ev.req_id)
                    send.send_nowait(ev)
                elif isinstance(ev, Cancel):
                    if ev.req_id in pending:
                        cancelled.add(ev.req_id)
                else:
                    with trio.move_on_after(st.idle_timeout) as idle:
                        data = await stream.receive_some(_RECV)
                    if idle.cancelled_caught:
                        if pending:
                            continue
                        log.debug("peerwire connection of %s idle for %.0f s: closed", grant.peer_id, st.idle_timeout)
                        break
                    if not data:
                        break
                    proto.receive_data(data)


async def _handle_conn(stream: trio.SocketStream, st: _ServeState) -> None:
    """The per-connection supervisor: one client's failure never reaches the server."""
    try:
        await _serve_conn(stream, st)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError, OSError) as eg:
        log.debug("peerwire connection ended: %r", eg.exceptions[0])
    except* Exception:
        log.exception("peerwire connection failed")
    finally:
        await stream.aclose()


async def serve_peerwire(
    locator: PieceLocator,
    redeem: Redeem,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    up: RateLimiter | None = None,
    psk: bytes | None = None,
    idle_timeout: float = 120.0,
    inbound: trio.MemoryReceiveChannel[trio.SocketStream] | None = None,
    task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve pieces until cancelled; reports the bound (host, port) via ``task_status``.

    With ``psk`` (a private swarm's key) every byte after Auth is sealed. An
    authenticated connection with nothing in flight for ``idle_timeout`` is closed.
    Sockets arriving on ``inbound`` (this node dialled them: a reverse dial,
    node/swarm/reverse.py) are served like accepted ones.
    """
    st = _ServeState(locator, redeem, up or RateLimiter(None), psk=psk, idle_timeout=idle_timeout)
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    served = RecentlyServed()
    _SERVED.set(served)  # this task's context: the connection tasks below inherit it
    try:
        async with trio.open_nursery() as nursery:
            task_status.started((sockname[0], sockname[1]))
            nursery.start_soon(_sweep_served, served)
            if inbound is not None:
                nursery.start_soon(_serve_inbound, inbound, st, nursery)
            await trio.serve_listeners(lambda s: _handle_conn(s, st), listeners, handler_nursery=nursery)
    finally:
        served.clear()


async def _sweep_served(served: RecentlyServed) -> None:
    """Drop the uploads no peer asked for again within ``keep_s`` (a worker thread: each drop is ~1 ms)."""
    while True:
        await trio.sleep(1.0)
        if len(served):
            await trio.to_thread.run_sync(served.expire)


async def _serve_inbound(inbound: trio.MemoryReceiveChannel[trio.SocketStream], st: _ServeState, nursery: trio.Nursery) -> None:
    async for stream in inbound:
        nursery.start_soon(_handle_conn, stream, st)


@dataclass(slots=True)
class _Direct:
    """A raw payload being read with recv_into: its buffer and how much of it is filled."""

    buf: bytearray | memoryview
    pos: int


@dataclass(slots=True)
class _Slot:
    result: PieceReceived | Rejected | None = None
    file_offset: int = 0  # where the piece lies in its file: its buffer lines up with it (_page_aligned)


class PeerwireConnection:
    """A client connection: ``await conn.fetch(mid, index, length)`` from many tasks at once.

    Strategy: no background reader. Requests are pipelined; whichever waiting
    task holds the receive lock reads and dispatches answers to every slot
    until its own is filled, then hands the lock on. Nothing outlives the
    callers, so the connection needs no nursery of its own.
    """

    def __init__(self, stream: trio.SocketStream, down: RateLimiter) -> None:
        self._stream: trio.SocketStream | AeadStream = stream
        self._proto = PeerwireClient()
        self._slots: dict[int, _Slot] = {}
        self._next_id = 1
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._down = down
        self._broken: BaseException | None = None
        self._direct: _Direct | None = None
        self._lowat = LowWater(max_lowat=_LOWAT_MAX, carry_rate=True)
        self.bytes_received = 0

    @property
    def in_flight(self) -> int:
        return len(self._slots)

    @property
    def broken(self) -> bool:
        return self._broken is not None

    async def aclose(self) -> None:
        self._broken = self._broken or trio.ClosedResourceError("closed")
        await self._stream.aclose()

    async def _handshake(self, token: bytes, psk: bytes | None) -> None:
        await self._stream.send_all(self._proto.auth(token))
        if psk is not None:
            assert isinstance(self._stream, trio.SocketStream)
            c2s, s2c = derive_keys(psk, token)
            self._stream = AeadStream(self._stream, c2s, s2c)
        while True:
            ev = self._proto.next_event()
            if isinstance(ev, Welcome):
                return
            if isinstance(ev, Rejected):
                raise PeerRejected(ev.reason)
            if ev is NEED_DATA:
                self._proto.receive_data(await self._stream.receive_some(_RECV))

    async def _pump_until(self, slot: _Slot) -> None:
        async with self._recv_lock:
            while slot.result is None and self._broken is None:
                # A payload whose reader was cancelled mid-way is finished first.
                ev = self._proto.next_event() if self._direct is None else NEED_DATA
                if isinstance(ev, (PieceReceived, Rejected)):
                    done = self._slots.pop(ev.req_id, None)
                    if done is not None:
                        done.result = ev
                    continue
                stream = self._stream
                if self._direct is None and isinstance(stream, trio.SocketStream) and self._proto.body_remaining >= _DIRECT_MIN:
                    owner = self._slots.get(self._proto.body_req_id or 0)
                    at = owner.file_offset if owner is not None else 0
                    started = self._proto.start_body_into(partial(_page_aligned, at=at))  # None if compressed
                    if started is not None:
                        self._direct = _Direct(*started)
                if self._direct is not None and isinstance(stream, trio.SocketStream):
                    got = await self._receive_body_direct(stream.socket, self._direct)
                    done = self._slots.pop(got.req_id, None)
                    if done is not None:
                        done.result = got
                    continue
                with trio.move_on_after(STALL_TIMEOUT) as stalled:
                    data = await self._stream.receive_some(_RECV)
                if stalled.cancelled_caught:
                    _stalled()
                self._proto.receive_data(data)
                if data:
                    await self._down.acquire(len(data))

    async def _receive_body_direct(self, sock: trio.socket.SocketType, d: _Direct) -> PieceReceived:
        """A raw payload read straight into its own buffer: no per-chunk bytes, no joins, no slicing.

        Cancellation-safe: progress lives in ``d`` (the connection's), so the
        next task to hold the receive lock carries on where this one stopped.
        """
        view = memoryview(d.buf)
        # One cancel scope per payload, its deadline pushed on by each read (not one scope per read).
        with trio.CancelScope() as scope:
            while d.pos < len(d.buf):
                scope.deadline = trio.current_time() + STALL_TIMEOUT
                n = await self._lowat.recv_into(sock, view[d.pos :], len(d.buf) - d.pos)
                if n == 0:
                    raise RemoteProtocolError(f"peer closed {len(d.buf) - d.pos} bytes short of a payload")
                d.pos += n
                scope.deadline = math.inf  # waiting for our own rate limit is no stall
                await self._down.acquire(n)
        if scope.cancelled_caught:
            _stalled()
        self._lowat.done(sock)  # frame headers follow: small reads must wake again
        self._direct = None
        return self._proto.body_filled()

    async def fetch(self, manifest_id: bytes, index: int, length: int, file_offset: int = 0) -> bytes | bytearray | memoryview:
        """One whole piece (hash not checked here). PeerRejected or SourceError on failure.

        ``file_offset``: where the piece goes in its file; the buffer is placed
        to line up with it, so the store can write it without a copy.
        """
        if self._broken is not None:
            raise SourceError(f"peerwire connection is broken: {self._broken!r}")
        req_id = self._next_id
        self._next_id += 1
        slot = self._slots[req_id] = _Slot(file_offset=file_offset)
        try:
            async with self._send_lock:
                await self._stream.send_all(self._proto.request(req_id, manifest_id, index, length))
            await self._pump_until(slot)
        except trio.Cancelled:
            if self._broken is None and slot.result is None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        async with self._send_lock:
                            await self._stream.send_all(self._proto.cancel(req_id))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        self._broken = exc
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError, OSError) as exc:
            self._broken = exc
            raise SourceError(f"peerwire connection broke: {exc!r}") from exc
        except SourceError as exc:
            self._broken = exc
            raise
        res = slot.result
        if res is None:
            raise SourceError(f"peerwire connection broke: {self._broken!r}")
        if isinstance(res, Rejected):
            raise PeerRejected(res.reason)
        self.bytes_received += res.wire_bytes
        return res.data


async def connect_peerwire(
    host: str, port: int, token: bytes, down: RateLimiter | None = None, psk: bytes | None = None
) -> PeerwireConnection:
    """Dial and authenticate; the caller owns the result and must ``aclose()`` it.

    With ``psk`` (a private swarm's key) every byte after Auth is sealed.
    """
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise SourceError(f"cannot connect to peer at {host}:{port}: {exc.strerror or exc}") from exc
    return await handshake_peerwire(stream, token, down, psk, f"{host}:{port}")


async def handshake_peerwire(
    stream: trio.SocketStream, token: bytes, down: RateLimiter | None = None, psk: bytes | None = None, where: str = "peer"
) -> PeerwireConnection:
    """Authenticate as the client on a connected socket (dialled, or dialled back by the peer: node/swarm/reverse.py).

    Takes ownership of ``stream``: closed on failure, else owned by the result.
    """
    conn = PeerwireConnection(stream, down or RateLimiter(None))
    try:
        with trio.fail_after(10):
            await conn._handshake(token, psk)
    except (trio.TooSlowError, trio.BrokenResourceError, OSError, RemoteProtocolError) as exc:
        await stream.aclose()
        raise SourceError(f"peerwire handshake with {where} failed: {exc!r}") from exc
    except BaseException:
        await stream.aclose()
        raise
    return conn


@asynccontextmanager
async def open_peerwire_connection(
    host: str, port: int, token: bytes, down: RateLimiter | None = None, psk: bytes | None = None
) -> AsyncIterator[PeerwireConnection]:
    """``async with open_peerwire_connection(host, port, token) as conn:``; SourceError if refused."""
    conn = await connect_peerwire(host, port, token, down, psk)
    try:
        yield conn
    finally:
        await conn.aclose()
