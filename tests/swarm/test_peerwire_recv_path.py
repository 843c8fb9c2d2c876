"""The piece channel's receive path on real TCP sockets (127.0.0.1): a payload read with
recv_into under one stall deadline, the download limit never mistaken for a stall, and
the low-water mark carried from one piece to the next on a connection."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from autoglm.node._lowat import MAX_LOWAT, LowWater
from autoglm.node._peerwire import _LOWAT_MAX, STALL_TIMEOUT, connect_peerwire
from autoglm.node._ratelimit import RateLimiter
from autoglm.node.errors import SourceError
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._peerwire import Codec, PeerwireServer, Request, verify_piece

MID = b"M" * 32
PAYLOAD = os.urandom(2 << 20)


async def _peer(listener: trio.SocketListener, *, send_upto: int, pieces: int = 1) -> None:
    """A hand-driven peer: answers each request with the raw payload's first ``send_upto`` bytes, then waits."""
    stream = await listener.accept()
    srv = PeerwireServer()
    async with stream:
        answered = 0
        while answered < pieces:
            data = await stream.receive_some(1 << 16)
            if not data:
                return
            srv.receive_data(data)
            while (ev := srv.next_event()) is not NEED_DATA:
                if isinstance(ev, Request):
                    await stream.send_all(srv.piece_header(ev.req_id, Codec.RAW, len(PAYLOAD)) + PAYLOAD[:send_upto])
                    answered += 1
                else:  # Auth
                    await stream.send_all(srv.accept())
        await trio.sleep_forever()


async def _listener() -> tuple[trio.SocketListener, int]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener, listener.socket.getsockname()[1]


def test_a_peer_that_stops_mid_payload_is_a_stall_after_the_timeout() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0.3)  # real bytes arrive before virtual time jumps

    async def main() -> None:
        listener, port = await _listener()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _peer(listener, send_upto=len(PAYLOAD) // 2))
            conn = await connect_peerwire("127.0.0.1", port, b"t" * 32)
            t0 = trio.current_time()
            with pytest.raises(SourceError, match="sent nothing"):
                await conn.fetch(MID, 0, len(PAYLOAD))
            assert conn._direct is not None and conn._direct.pos >= len(PAYLOAD) // 2  # the recv_into path
            assert trio.current_time() - t0 == pytest.approx(STALL_TIMEOUT, abs=1.0)
            await conn.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


def test_waiting_for_the_download_limit_is_no_stall() -> None:
    # 2 MiB at 64 KiB/s: ~28 s of limiter waits, longer than STALL_TIMEOUT, and no stall.
    clock = trio.testing.MockClock(autojump_threshold=0.3)

    async def main() -> None:
        listener, port = await _listener()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _peer(listener, send_upto=len(PAYLOAD)))
            down = RateLimiter(64 * 1024)
            conn = await connect_peerwire("127.0.0.1", port, b"t" * 32, down=down)
            t0 = trio.current_time()
            got = await conn.fetch(MID, 0, len(PAYLOAD))
            assert bytes(got) == PAYLOAD
            assert trio.current_time() - t0 > STALL_TIMEOUT and down.waited_seconds > STALL_TIMEOUT
            await conn.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


async def test_whole_pieces_arrive_and_verify() -> None:
    import blake3

    listener, port = await _listener()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _peer(listener, send_upto=len(PAYLOAD), pieces=3))
        conn = await connect_peerwire("127.0.0.1", port, b"t" * 32)
        with trio.fail_after(30):
            for i in range(3):
                verify_piece(await conn.fetch(MID, i, len(PAYLOAD)), blake3.blake3(PAYLOAD).digest())
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return client, server


@pytest.mark.parametrize("carry", [False, True])
async def test_the_next_body_starts_at_the_last_bodys_mark_only_when_carried(carry: bool) -> None:
    sender, receiver = await _pair()
    lw = LowWater(max_lowat=_LOWAT_MAX, carry_rate=carry)
    lw._t0, lw._bytes = trio.current_time() - 1.0, 200 << 20  # a body that ran at 200 MiB/s
    lw.done(receiver)
    assert receiver.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1  # frame headers still wake
    await sender.send(b"h" * 100)
    buf = bytearray(8 << 20)
    with trio.fail_after(5):
        assert await lw.recv_into(receiver, memoryview(buf), 100) == 100  # never above what is expected
        await sender.send(b"x" * (2 << 20))
        got = 0
        mark = None
        while got < 2 << 20:
            got += await lw.recv_into(receiver, memoryview(buf)[got:], (8 << 20) - got)
            mark = mark or receiver.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
    # 200 MiB/s x 25 ms = 5 MiB, capped at the piece channel's 1 MiB; without carrying: mark 1 for 50 ms
    assert mark == (_LOWAT_MAX if carry else 1)
    assert _LOWAT_MAX > MAX_LOWAT
    sender.close()
    receiver.close()
