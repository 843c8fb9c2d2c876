"""node/swarm/reverse.py on 127.0.0.1: real libp2p hosts, real sockets, a peerwire server that cannot be dialled.

"B" plays the node behind NAT: the port A is told to dial is closed, so A's
direct attempt fails and A must get B's pieces over the socket B dials back.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest
import trio

from autoglm.node._p2p import P2PNode, open_p2p
from autoglm.node._peerwire import PieceLocation, serve_peerwire
from autoglm.node._ratelimit import RateLimiter
from autoglm.node.errors import SourceError
from autoglm.node.swarm.reverse import (
    PEERWIRE_STREAM_ID,
    REVERSE_PROTOCOL_ID,
    Reverse,
    may_be_unreachable,
)
from autoglm.protocol._peerwire import RejectReason, verify_piece

MID = b"N" * 32
PIECE = 64 * 1024


@dataclass
class Locator:
    path: Path
    hashes: list[bytes]

    def locate(self, manifest_id: bytes, index: int) -> PieceLocation | None:
        if manifest_id != MID or not 0 <= index < len(self.hashes):
            return None
        return PieceLocation(self.path, index * PIECE, PIECE, self.hashes[index], False)


@dataclass
class Grant:
    peer_id: str
    sent: list[int] = field(default_factory=list)
    # The server counts a piece once its sendfile thread is back, which can be after the client has the last byte.
    eight_sent: trio.Event = field(default_factory=trio.Event)

    def check(self, manifest_id: bytes, index: int) -> RejectReason | None:
        return None

    def served(self, manifest_id: bytes, index: int, nbytes: int) -> None:
        self.sent.append(index)
        if len(self.sent) == 8:
            self.eight_sent.set()

    def release(self) -> None:
        pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pair:
    a: P2PNode
    b: P2PNode
    rev_a: Reverse
    rev_b: Reverse
    grants: dict[bytes, Grant]
    loc: Locator


@asynccontextmanager
async def _pair(tmp_path: Path, b_in_session: bool = True) -> AsyncIterator[Pair]:
    data = blake3.blake3(b"natted").digest(length=8 * PIECE)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    loc = Locator(path, [blake3.blake3(data[i * PIECE : (i + 1) * PIECE]).digest() for i in range(8)])
    grants: dict[bytes, Grant] = {}
    async with open_p2p(tmp_path / "a") as a, open_p2p(tmp_path / "b", bootstrap=[a.addrs()[0]]) as b, \
            trio.open_nursery() as nursery:
        # B dialled A (as a NATed node dials out); A reaches B only over that connection.
        rev_a = Reverse(a, "127.0.0.1", RateLimiter(None), None, lambda p: True, reverse_timeout=3.0)
        rev_b = Reverse(b, "127.0.0.1", RateLimiter(None), None, lambda p: b_in_session and p == a.peer_id)
        await nursery.start(rev_a.serve_rendezvous)
        b.set_stream_handler(REVERSE_PROTOCOL_ID, rev_b.on_request)
        b.set_stream_handler(PEERWIRE_STREAM_ID, rev_b.on_stream)
        await nursery.start(lambda task_status: serve_peerwire(
            loc, grants.pop, inbound=rev_b.inbound, task_status=task_status))
        yield Pair(a, b, rev_a, rev_b, grants, loc)
        nursery.cancel_scope.cancel()


async def test_reverse_dial_carries_verified_pieces(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with _pair(tmp_path) as p:
            token = b"t" * 32
            p.grants[token] = grant = Grant(p.a.peer_id)
            conn = await p.rev_a.connect(p.b.peer_id, "127.0.0.1", _closed_port(), token)
            try:
                for i in range(8):
                    verify_piece(bytes(await conn.fetch(MID, i, PIECE)), p.loc.hashes[i])
            finally:
                await conn.aclose()
            await grant.eight_sent.wait()
            assert grant.sent == list(range(8))
            st = p.rev_a.stats.as_dict()
            assert st["connections"] == {"direct": 0, "reverse": 1, "libp2p": 0, "relayed": 0}
            assert st["failed"] == {"direct": 1, "reverse": 0, "libp2p": 0, "relayed": 0}
            assert st["bytes"] == {"direct": 0, "reverse": 8 * PIECE, "libp2p": 0, "relayed": 0}
            assert p.rev_b.stats.served_reverse == 1
            # Within DIRECT_RETRY the direct dial is not tried again.
            token2 = b"u" * 32
            p.grants[token2] = Grant(p.a.peer_id)
            conn = await p.rev_a.connect(p.b.peer_id, "127.0.0.1", _closed_port(), token2)
            await conn.aclose()
            assert p.rev_a.stats.failed["direct"] == 1
            assert p.rev_a.stats.connections["reverse"] == 2


async def test_no_reverse_dial_nor_stream_for_a_peer_without_a_session(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with _pair(tmp_path, b_in_session=False) as p:
            p.grants[b"t" * 32] = Grant(p.a.peer_id)
            # Reverse dial refused, then the peerwire stream over libp2p refused too.
            with pytest.raises(SourceError, match="peerwire handshake"):
                await p.rev_a.connect(p.b.peer_id, "127.0.0.1", _closed_port(), b"t" * 32)
            assert p.rev_b.stats.served_reverse == 0
            assert p.rev_b.stats.served_relayed == 0
            assert p.rev_a.stats.failed == {"direct": 1, "reverse": 1, "libp2p": 1, "relayed": 0}


async def test_peerwire_over_libp2p_carries_verified_pieces(tmp_path: Path) -> None:
    """No peer IP (a session over a relayed connection): peerwire runs on a libp2p stream, bridged to sockets."""
    with trio.fail_after(60):
        async with _pair(tmp_path) as p:
            token = b"r" * 32
            p.grants[token] = grant = Grant(p.a.peer_id)
            conn = await p.rev_a.connect(p.b.peer_id, None, 0, token)
            try:
                for i in range(8):
                    verify_piece(bytes(await conn.fetch(MID, i, PIECE)), p.loc.hashes[i])
            finally:
                await conn.aclose()
            await grant.eight_sent.wait()
            assert grant.sent == list(range(8))
            st = p.rev_a.stats.as_dict()
            assert st["connections"] == {"direct": 0, "reverse": 0, "libp2p": 1, "relayed": 0}
            assert st["bytes"] == {"direct": 0, "reverse": 0, "libp2p": 8 * PIECE, "relayed": 0}
            assert p.rev_b.stats.served_relayed == 1
            # A wrong token is refused by the server as on TCP: the grant is the token's.
            with pytest.raises(SourceError):
                await p.rev_a.connect(p.b.peer_id, None, 0, b"w" * 32)


async def test_rendezvous_drops_a_socket_without_a_known_nonce(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with _pair(tmp_path) as p:
            assert p.rev_a.port is not None
            sock = await trio.open_tcp_stream("127.0.0.1", p.rev_a.port)
            await sock.send_all(b"x" * 32)
            assert await sock.receive_some(1) == b""  # closed on us
            await sock.aclose()


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (["10.78.0.2"], True),
        (["192.168.1.5", "100.64.0.9"], True),
        (["fd00::5"], True),
        (["11.77.0.2"], False),
        (["10.0.0.2", "11.77.0.2"], False),
        (["127.0.0.1"], False),
        ([], False),
    ],
)
def test_may_be_unreachable(hosts: list[str], expected: bool) -> None:
    assert may_be_unreachable(hosts) is expected
