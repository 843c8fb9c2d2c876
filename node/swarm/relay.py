"""Peerwire over a libp2p stream: the last path to a peer's pieces when no TCP connection can be made.

Theory of operation
-------------------
Two nodes behind different NATs can neither dial each other nor be
reverse-dialled (node/swarm/reverse.py): each one's rendezvous listener is
behind its own NAT. Both reach a public relay, though. With circuit relay v2
(py-libp2p's, set up in node/_p2p.py) the node behind NAT reserves a slot at
its relays, and a peer that cannot dial it opens a libp2p connection to it
through one of them; the control session then runs on that connection as on
any other.

Pieces follow the same way: the fetching node opens
``/autoglm/peerwire/1`` on the libp2p connection (relayed, or any other),
and both ends speak ordinary peerwire on it: Auth with the one-time token
from Hello, Requests, pieces; the serving side hands its end to
``serve_peerwire(inbound=...)``, so token, grants, choking, rate limits and
per-peer budgets are exactly those of a TCP connection, and every piece is
hash-checked by the receiver. The relay sees only Noise ciphertext.

The peerwire code works on sockets (``sendfile`` out, ``recv_into`` in), so
each end bridges the libp2p stream to one end of a local socket pair and
gives peerwire the other. The bridge copies promptly in both directions:
py-libp2p streams die when their reader stalls for about 5 s, so the pump
never waits on peerwire for longer than the socket pair's buffer takes to
drain, and a bridge that cannot hand its bytes on within
:data:`_STALL_TIMEOUT` ends the stream.

Budgets: the serving side opens a relayed peerwire stream only for a peer it
has a control session with, at most ``peerwire_conns`` at once per peer; the
relay's own budget (reservations, circuits per peer, bytes and seconds per
circuit) is ``RelayBudget`` in node/_relays.py.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from autoglm.node._p2p import ControlStream

__all__ = ["PEERWIRE_STREAM_ID", "bridge", "open_bridge"]

log = logging.getLogger("autoglm.node.swarm")

PEERWIRE_STREAM_ID = "/autoglm/peerwire/1"
_CHUNK = 256 * 1024
#: A bridge direction that cannot hand bytes on for this long ends the stream.
_STALL_TIMEOUT = 30.0


def open_bridge() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected local socket pair: (peerwire's end, the bridge's end)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(trio.socket.from_stdlib_socket(b))


async def bridge(stream: ControlStream, local: trio.SocketStream) -> None:
    """Copy bytes both ways between a libp2p stream and the bridge's socket until either side ends."""

    async def to_local() -> None:
        while True:
            data = await stream.receive_some(_CHUNK)
            if not data:
                return
            with trio.fail_after(_STALL_TIMEOUT):
                await local.send_all(data)

    async def to_remote() -> None:
        while True:
            data = await local.receive_some(_CHUNK)
            if not data:
                return
            with trio.fail_after(_STALL_TIMEOUT):
                await stream.send_all(data)

    try:
        async with trio.open_nursery() as nursery:

            async def one(fn: Callable[[], Awaitable[None]]) -> None:
                try:
                    await fn()
                finally:
                    nursery.cancel_scope.cancel()  # one direction ended: the connection is over

            nursery.start_soon(one, to_local)
            nursery.start_soon(one, to_remote)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as eg:
        log.debug("relayed peerwire stream ended: %r", eg.exceptions[0])
    finally:
        await local.aclose()
        await stream.aclose()
