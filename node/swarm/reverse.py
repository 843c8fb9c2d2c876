"""Reaching a peer's pieces when its peerwire endpoint cannot be dialled (a peer behind NAT).

Theory of operation
-------------------
A node behind NAT (MASQUERADE, a home router, a cloud NAT gateway) dials out
freely, and its libp2p connections to public nodes therefore exist; but the
peerwire endpoint it announces in Hello is a port on a private address, and
the IP its session comes from is the NAT's, where nothing listens. A public
node that wants its pieces cannot dial it.

The libp2p connection the NATed node opened carries streams both ways, so
the public node asks *it* to dial:

1. The fetching node (A) tries the direct dial (the session's IP, the port
   from Hello) for at most :data:`DIRECT_TIMEOUT`. A peer whose direct dial
   failed is not tried directly again for :data:`DIRECT_RETRY` seconds (nor
   by reverse dial, after a failed one).
2. A opens ``/autoglm/reverse/1`` to the peer (B) over libp2p and sends a
   fresh 32-byte nonce and the port of its rendezvous listener.
3. B dials A at the IP its own libp2p connection to A comes from (never an
   address A names: the same rule as the direct path), and writes the nonce.
4. A's rendezvous listener matches the nonce to the waiting request and hands
   the socket over; A then speaks peerwire on it as the client (Auth with the
   one-time token from B's Hello, then Requests), and B serves it exactly as
   it serves an accepted connection (``serve_peerwire``'s ``inbound``
   channel): token, grants, choking and budgets are unchanged.

Budgets: B answers reverse requests only from peers it has a control session
with, at most ``peerwire_conns`` a minute per peer, one at a time per peer;
A's listener drops a socket that sends no known nonce within 5 s, and holds
at most 64 unmatched sockets at once.

The nonce is a capability sent only over the Noise-authenticated libp2p
stream, and the token still authenticates the peerwire session itself.

When neither works (both peers behind NAT, or a session that runs over a
relayed libp2p connection and so has no peer IP at all), the third path is
peerwire over a libp2p stream on the connection the session uses, relayed or
not (node/swarm/relay.py).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from autoglm.node._p2p import ControlStream, P2PNode
from autoglm.node._peerwire import PeerwireConnection, handshake_peerwire
from autoglm.node._ratelimit import RateLimiter
from autoglm.node.errors import SourceError

from .relay import PEERWIRE_STREAM_ID, bridge, open_bridge

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = [
    "DIRECT_RETRY", "DIRECT_TIMEOUT", "PEERWIRE_STREAM_ID", "REVERSE_PROTOCOL_ID", "PathStats", "Reverse", "may_be_unreachable",
]

log = logging.getLogger("autoglm.node.swarm")

REVERSE_PROTOCOL_ID = "/autoglm/reverse/1"
#: A direct peerwire dial that has not connected by then has failed (a NAT that drops SYNs).
DIRECT_TIMEOUT = 3.0
#: After a failed direct dial, the peer is reached by reverse dial only for this long.
DIRECT_RETRY = 60.0
_NONCE = 32
_MAX_UNMATCHED = 64
_MAX_REMEMBERED = 4096  # peers remembered per table before expired entries are dropped
_PATHS = ("direct", "reverse", "libp2p", "relayed")  # libp2p: peerwire on a direct libp2p connection (hole-punched, say)


def may_be_unreachable(listen_hosts: Iterable[str]) -> bool:
    """Whether peers elsewhere may be unable to dial us: no listen address is public.

    Such a node (behind NAT, or on a LAN) also dials the peers it is introduced
    to for the manifests it holds, since they may not be able to dial it; a
    node on loopback (tests, the demo) or with a public address leaves that to
    the fetching side, as before.
    """
    ips = [ip for ip in (_ip(h) for h in listen_hosts) if ip is not None]
    return bool(ips) and not any(ip.is_global or ip.is_loopback for ip in ips)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass
class PathStats:
    """How this node's peerwire client connections were made, and the piece bytes each path carried."""

    connections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PATHS, 0))
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PATHS, 0))
    served_reverse: int = 0  # reverse dials this node made to serve a peer
    served_relayed: int = 0  # peerwire streams over libp2p this node served
    _conns: list[tuple[str, PeerwireConnection]] = field(default_factory=list)
    _closed_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PATHS, 0))

    def add(self, path: str, conn: PeerwireConnection) -> None:
        self.connections[path] += 1
        # Closed connections fold into a sum so the list stays as short as the live set.
        live = []
        for p, c in self._conns:
            if c.broken:
                self._closed_bytes[p] += c.bytes_received
            else:
                live.append((p, c))
        self._conns = [*live, (path, conn)]

    def bytes_by_path(self) -> dict[str, int]:
        out = dict(self._closed_bytes)
        for p, c in self._conns:
            out[p] += c.bytes_received
        return out

    def as_dict(self) -> dict[str, object]:
        return {"connections": dict(self.connections), "failed": dict(self.failed),
                "bytes": self.bytes_by_path(), "served_by_reverse_dial": self.served_reverse,
                "served_relayed": self.served_relayed}


class Reverse:
    """Direct-then-reverse peerwire dialling, the rendezvous listener, and the serving side."""

    def __init__(
        self, p2p: P2PNode, host: str, down: RateLimiter, psk: bytes | None, in_session: Callable[[str], bool],
        per_minute: int = 4, reverse_timeout: float = 10.0,
    ) -> None:
        self._p2p = p2p
        self._host = host
        self._down = down
        self._psk = psk
        self._in_session = in_session
        self._per_minute = per_minute
        self._reverse_timeout = reverse_timeout
        self.stats = PathStats()
        self.port: int | None = None
        self._waiting: dict[bytes, tuple[str, trio.MemorySendChannel[trio.SocketStream]]] = {}
        self._no_direct: dict[str, float] = {}  # peer -> until when only reverse dials are tried
        self._no_reverse: dict[str, float] = {}  # peer -> until when only libp2p streams are tried
        self._asked: dict[str, list[float]] = {}  # peer -> times of its recent reverse requests
        self._busy: set[str] = set()
        self._streams: dict[str, int] = {}  # peer -> peerwire streams over libp2p we serve it now
        self._nursery: trio.Nursery | None = None  # the bridges of our relayed client connections
        self._unmatched = trio.CapacityLimiter(_MAX_UNMATCHED)
        # Sockets this node dialled to serve a peer: serve_peerwire serves them like accepted ones.
        self.inbound_send, self.inbound = trio.open_memory_channel[trio.SocketStream](0)

    # -- the fetching side ---------------------------------------------------------
    async def connect(self, peer_id: str, remote_host: str | None, port: int, token: bytes) -> PeerwireConnection:
        """A peerwire client connection to ``peer_id``: direct if it answers, else reverse-dialled, else over libp2p.

        ``remote_host`` is None when the session runs over a relayed libp2p
        connection: there is no IP of the peer's to dial or be dialled from.
        """
        if remote_host is None:
            return await self._over_libp2p(peer_id, token)
        now = trio.current_time()
        if self._no_direct.get(peer_id, 0.0) <= now:
            try:
                with trio.fail_after(DIRECT_TIMEOUT):
                    sock = await trio.open_tcp_stream(remote_host, port)
            except (OSError, trio.TooSlowError) as exc:
                self.stats.failed["direct"] += 1
                if len(self._no_direct) > _MAX_REMEMBERED:
                    self._no_direct = {p: t for p, t in self._no_direct.items() if t > now}
                self._no_direct[peer_id] = now + DIRECT_RETRY
                log.info("peerwire of %s not reachable at %s:%d (%r); asking it to dial us", peer_id, remote_host, port, exc)
            else:
                # It answered: the path works; a refusal from here on is the peer's (the token is spent).
                conn = await handshake_peerwire(sock, token, self._down, self._psk, f"{remote_host}:{port}")
                self.stats.add("direct", conn)
                return conn
        if self._no_reverse.get(peer_id, 0.0) > now:
            return await self._over_libp2p(peer_id, token)
        try:
            conn = await self._reverse(peer_id, token)
        except SourceError as exc:
            self.stats.failed["reverse"] += 1
            if len(self._no_reverse) > _MAX_REMEMBERED:
                self._no_reverse = {p: t for p, t in self._no_reverse.items() if t > now}
            self._no_reverse[peer_id] = now + DIRECT_RETRY
            log.info("reverse dial from %s failed (%s); peerwire over libp2p instead", peer_id, exc)
            return await self._over_libp2p(peer_id, token)
        self.stats.add("reverse", conn)
        return conn

    async def _over_libp2p(self, peer_id: str, token: bytes) -> PeerwireConnection:
        """Peerwire on a libp2p stream over the connection the session uses (relayed or not)."""
        if self._nursery is None:
            raise SourceError("no nursery for relayed peerwire streams")
        # Both ends behind NAT: a hole punch first, so the stream below goes direct if it works.
        await self._p2p.upgrade_direct(peer_id)
        try:
            stream = await self._p2p.open_stream(peer_id, PEERWIRE_STREAM_ID)
        except SourceError:
            self.stats.failed["relayed"] += 1
            raise
        path = "relayed" if stream.relayed else "libp2p"
        mine, theirs = open_bridge()
        self._nursery.start_soon(bridge, stream, theirs)
        try:
            conn = await handshake_peerwire(mine, token, self._down, self._psk, f"peerwire over libp2p to {peer_id}")
        except SourceError:
            self.stats.failed[path] += 1
            raise
        self.stats.add(path, conn)
        return conn

    async def _reverse(self, peer_id: str, token: bytes) -> PeerwireConnection:
        if self.port is None:
            raise SourceError("no rendezvous listener for reverse dials")
        nonce = secrets.token_bytes(_NONCE)
        send, recv = trio.open_memory_channel[trio.SocketStream](1)
        self._waiting[nonce] = (peer_id, send)
        try:
            stream = await self._p2p.open_stream(peer_id, REVERSE_PROTOCOL_ID)
            try:
                await stream.send_all(nonce + self.port.to_bytes(2, "big"))
            except trio.BrokenResourceError as exc:
                raise SourceError(f"cannot ask {peer_id} to dial us: {exc}") from exc
            finally:
                await stream.aclose()
            with trio.move_on_after(self._reverse_timeout):
                sock = await recv.receive()
                return await handshake_peerwire(sock, token, self._down, self._psk, f"reverse dial from {peer_id}")
            raise SourceError(f"peer {peer_id} did not dial back within {self._reverse_timeout:.0f} s")
        finally:
            del self._waiting[nonce]
            send.close()
            # a socket that arrived after we stopped waiting
            try:
                late = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                pass
            else:
                await late.aclose()

    async def serve_rendezvous(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept the sockets peers dial back to us; reports the bound port."""
        listeners = await trio.open_tcp_listeners(0, host=self._host)
        self.port = int(listeners[0].socket.getsockname()[1])
        # Our own accept loop: trio.serve_listeners closes a socket when its handler
        # returns, and a matched socket lives on as a peerwire connection.
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self.port)
            for listener in listeners[1:]:
                nursery.start_soon(self._accept, listener, nursery)
            await self._accept(listeners[0], nursery)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    sock = await listener.accept()
                except OSError as exc:  # EMFILE and the like: wait, as trio.serve_listeners does
                    log.warning("rendezvous accept failed: %r", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._match, sock)

    async def _match(self, sock: trio.SocketStream) -> None:
        handed = False
        try:
            async with self._unmatched:
                buf = b""
                with trio.move_on_after(5):
                    while len(buf) < _NONCE:
                        data = await sock.receive_some(_NONCE - len(buf))
                        if not data:
                            break
                        buf += data
                waiting = self._waiting.get(buf) if len(buf) == _NONCE else None
                if waiting is None:
                    return
                try:
                    waiting[1].send_nowait(sock)
                    handed = True
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    return
        except (trio.BrokenResourceError, OSError):
            return
        finally:
            if not handed:
                await sock.aclose()

    # -- the serving side ----------------------------------------------------------
    async def on_request(self, stream: ControlStream) -> None:
        """A peer asks us to dial its rendezvous listener (we are the one it cannot reach)."""
        peer = stream.peer_id
        try:
            buf = b""
            with trio.move_on_after(5):
                while len(buf) < _NONCE + 2:
                    data = await stream.receive_some(_NONCE + 2 - len(buf))
                    if not data:
                        break
                    buf += data
        except trio.BrokenResourceError:
            return
        finally:
            await stream.aclose()
        host = stream.remote_host
        if len(buf) != _NONCE + 2 or host is None or not self._admit(peer):
            log.info("reverse dial request from %s refused", peer)
            return
        self._busy.add(peer)
        try:
            port = int.from_bytes(buf[_NONCE:], "big")
            with trio.fail_after(DIRECT_TIMEOUT):
                sock = await trio.open_tcp_stream(host, port)
            await sock.send_all(buf[:_NONCE])
            self.stats.served_reverse += 1
            await self.inbound_send.send(sock)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.info("reverse dial to %s at %s:%s failed: %r", peer, host, buf[_NONCE:].hex(), exc)
        finally:
            self._busy.discard(peer)

    async def on_stream(self, stream: ControlStream) -> None:
        """A peer asks for peerwire on a libp2p stream (it cannot reach our TCP endpoint, nor we its)."""
        peer = stream.peer_id
        if not self._in_session(peer) or self._streams.get(peer, 0) >= self._per_minute:
            log.info("peerwire stream from %s refused", peer)
            await stream.aclose()
            return
        self._streams[peer] = self._streams.get(peer, 0) + 1
        try:
            mine, theirs = open_bridge()
            with trio.move_on_after(5) as waited:  # serve_peerwire takes it as soon as it can start a task
                await self.inbound_send.send(mine)
            if waited.cancelled_caught:
                await mine.aclose()
                await theirs.aclose()
                await stream.aclose()
                return
            self.stats.served_relayed += 1
            await bridge(stream, theirs)
        finally:
            left = self._streams.pop(peer, 1) - 1
            if left > 0:
                self._streams[peer] = left

    def _admit(self, peer: str) -> bool:
        if not self._in_session(peer) or peer in self._busy:
            return False
        now = trio.current_time()
        recent = [t for t in self._asked.get(peer, ()) if now - t < 60.0]
        if len(recent) >= self._per_minute:
            self._asked[peer] = recent
            return False
        if len(self._asked) > _MAX_REMEMBERED:
            self._asked = {p: ts for p, ts in self._asked.items() if any(now - t < 60.0 for t in ts)}
        self._asked[peer] = [*recent, now]
        return True
