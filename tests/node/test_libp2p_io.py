"""py-libp2p's per-frame costs, cut (node/_libp2p_io.py): window credit in halves, read-ahead.

Real hosts on 127.0.0.1 for yamux; a socket pair for the TCP read-ahead.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trio
from libp2p.io.trio import TrioTCPStream
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE

from autoglm.node._libp2p_io import READ_AHEAD
from autoglm.node._p2p import ControlStream, P2PNode, open_p2p

logging.getLogger("libp2p").setLevel(logging.CRITICAL)


async def _pair(a: P2PNode, b: P2PNode, done: trio.Event) -> tuple[ControlStream, ControlStream]:
    """A control stream a -> b: (a's end, b's end), b's open until ``done``."""
    got, theirs = trio.open_memory_channel[ControlStream](1)

    async def handler(stream: ControlStream) -> None:
        await got.send(stream)
        await done.wait()
        await stream.aclose()

    b.set_control_handler(handler)
    await a.connect(b.addrs()[0])
    ours = await a.open_control(b.peer_id)
    return ours, await theirs.receive()


async def _read_exactly(stream: ControlStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await stream.receive_some()
        assert chunk, "stream ended early"
        out += chunk
    return bytes(out)


async def test_small_messages_read_one_by_one_cost_no_window_updates(tmp_path: Path) -> None:
    """Each read used to give its bytes back at once: one yamux frame the other way per message."""
    with trio.fail_after(30):
        async with open_p2p(tmp_path / "a") as a, open_p2p(tmp_path / "b") as b:
            done = trio.Event()
            ours, theirs = await _pair(a, b, done)
            window0 = ours._stream.muxed_stream.send_window  # the window less the protocol negotiation
            assert window0 > DEFAULT_WINDOW_SIZE - 100
            for i in range(100):
                await ours.send_all(bytes([i]) * 100)
                assert await _read_exactly(theirs, 100) == bytes([i]) * 100
            # A reply after the reads: any window update b sent is ahead of it on the connection.
            await theirs.send_all(b"ok")
            assert await _read_exactly(ours, 2) == b"ok"
            # 10,000 bytes read is under half the window: no credit came back yet.
            window = ours._stream.muxed_stream.send_window
            done.set()
            await ours.aclose()
            assert window == window0 - 100 * 100, (window0, window)


async def test_a_stream_larger_than_its_window_still_flows(tmp_path: Path) -> None:
    """Credit comes back in halves: 1 MiB in 1 KiB writes (4 windows) arrives whole and in order."""
    payload = bytes(range(256)) * 4096
    with trio.fail_after(60):
        async with open_p2p(tmp_path / "a") as a, open_p2p(tmp_path / "b") as b:
            done = trio.Event()
            ours, theirs = await _pair(a, b, done)
            received = bytearray()

            async def read_all() -> None:
                while len(received) < len(payload):
                    received.extend(await theirs.receive_some())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                for k in range(0, len(payload), 1024):
                    await ours.send_all(payload[k : k + 1024])
            done.set()
            await ours.aclose()
            assert bytes(received) == payload


async def test_tcp_reads_are_served_from_one_recv_in_order() -> None:
    left, right = socket.socketpair()
    with left, right:
        stream = TrioTCPStream(trio.SocketStream(trio.socket.from_stdlib_socket(left)))
        right.sendall(b"\x00\x05hello\x00\x03abc")
        with trio.fail_after(5):
            assert await stream.read(2) == b"\x00\x05"
            # The rest came with the first recv: the socket holds nothing more.
            with pytest.raises(BlockingIOError):
                left.recv(1, socket.MSG_DONTWAIT)
            assert await stream.read(5) == b"hello"
            assert await stream.read(2) == b"\x00\x03"
            assert await stream.read(None) == b"abc"
            assert await stream.read(0) == b""
            right.sendall(b"x" * (READ_AHEAD + 10))
            got = b""
            while len(got) < READ_AHEAD + 10:
                chunk = await stream.read(READ_AHEAD)
                assert 0 < len(chunk) <= READ_AHEAD
                got += chunk
            assert got == b"x" * (READ_AHEAD + 10)
            right.close()
            assert await stream.read(10) == b""
