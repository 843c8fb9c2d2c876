"""The adaptive SO_RCVLOWAT (node/_lowat.py) on a real TCP connection on 127.0.0.1."""

from __future__ import annotations

import socket

import trio

from autoglm.node._lowat import MAX_LOWAT, LowWater


async def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return client, server


async def test_steady_stream_coalesces_reads_and_the_tail_still_wakes() -> None:
    sender, receiver = await _pair()
    chunk, sends, tail = 64 << 10, 80, 1000
    total = chunk * sends + tail
    lw = LowWater()
    marks: list[int] = []
    reads = 0

    async def send() -> None:
        for _ in range(sends):
            await sender.send(b"x" * chunk)
            await trio.sleep(0.01)  # ~6.5 MB/s: a mirror's share of a capped link
        await sender.send(b"y" * tail)  # far below any raised mark

    buf = bytearray(1 << 20)
    got = 0
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while got < total:
                n = await lw.recv_into(receiver, memoryview(buf), total - got)
                assert n > 0
                got += n
                reads += 1
                marks.append(receiver.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))
    assert max(marks) > 16 << 10 and max(marks) <= MAX_LOWAT
    assert reads < sends  # several sends per wake-up
    lw.done(receiver)
    assert receiver.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    sender.close()
    receiver.close()


async def test_mark_never_exceeds_what_is_still_expected() -> None:
    sender, receiver = await _pair()
    lw = LowWater()
    lw._t0, lw._bytes = trio.current_time() - 1.0, 100 << 20  # as if it had been fast
    await sender.send(b"z" * 300)
    buf = bytearray(4096)
    with trio.fail_after(5):
        n = await lw.recv_into(receiver, memoryview(buf), 300)
    assert n == 300
    assert receiver.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) <= 300
    sender.close()
    receiver.close()
