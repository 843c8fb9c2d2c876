"""The piece channel's sendfile in a worker thread: the bytes, the peer that stops
reading (a bounded wait), cancellation (prompt, and no fd left behind)."""

from __future__ import annotations

import os
import socket
import time
from functools import partial
from pathlib import Path

import pytest
import trio

from autoglm.node import _peerwire
from autoglm.node._peerwire import _sendfile

SIZE = 24 << 20


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    p = tmp_path / "blob"
    p.write_bytes(data)
    return p, data


async def _pair() -> tuple[trio.SocketStream, socket.socket]:
    """A trio stream (the serving end) and a blocking socket at the other end, on 127.0.0.1."""
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", srv.getsockname()[1])
        peer, _ = srv.accept()
    finally:
        srv.close()
    return stream, peer


async def test_sendfile_sends_the_range(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    stream, peer = await _pair()
    got = bytearray()

    def read_all() -> None:
        while len(got) < SIZE - 5:
            chunk = peer.recv(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    before = _fds()
    fd = os.open(path, os.O_RDONLY)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, read_all)
            await _sendfile(stream.socket, fd, 5, SIZE - 5)
    finally:
        os.close(fd)
        await stream.aclose()
        peer.close()
    assert bytes(got) == data[5:]
    # The thread closed its duplicates: no descriptor opened during the send is still open. (A
    # count would also see descriptors that other objects' garbage collection closes meanwhile.)
    assert not _fds() - before


async def test_a_peer_that_stops_reading_breaks_the_send(blob: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_peerwire, "STALL_TIMEOUT", 0.5)
    path, _ = blob
    stream, peer = await _pair()
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.monotonic()
        with pytest.raises(trio.BrokenResourceError, match="took nothing"):
            await _sendfile(stream.socket, fd, 0, SIZE)
        assert time.monotonic() - t0 < 5
    finally:
        os.close(fd)
        await stream.aclose()
        peer.close()


async def test_cancel_returns_at_once_and_the_thread_lets_go(blob: tuple[Path, bytes]) -> None:
    path, _ = blob
    before = _fds()
    stream, peer = await _pair()
    fd = os.open(path, os.O_RDONLY)
    t0 = time.monotonic()
    with trio.move_on_after(0.3) as scope:
        await _sendfile(stream.socket, fd, 0, SIZE)  # nobody reads: blocks until cancelled
    assert scope.cancelled_caught and time.monotonic() - t0 < 1.0
    os.close(fd)
    await stream.aclose()
    # The abandoned thread sees the cancellation within its poll interval and closes its duplicates;
    # until it does, the peer still holds a live connection: its EOF says the thread let go.
    peer.settimeout(5)

    def drain() -> None:
        while peer.recv(1 << 20):
            pass

    await trio.to_thread.run_sync(drain)
    assert _fds() - before == {str(peer.fileno())}  # only the peer's socket is left
    peer.close()


async def test_slow_readers_do_not_hold_the_send_threads(blob: tuple[Path, bytes]) -> None:
    """Eight peers that read ~100 KiB/s (never silent long enough to be dropped) are being sent
    pieces: a ninth peer's piece still goes out at once, since a send waiting for room in its
    socket holds no thread (there are 8). Before, it waited for one of the slow pieces to end."""
    path, _ = blob
    fd = os.open(path, os.O_RDONLY)
    stop = False

    def trickle(peer: socket.socket) -> None:
        peer.settimeout(0.5)
        while not stop:
            try:
                if not peer.recv(1024):
                    return
            except OSError:
                pass
            time.sleep(0.01)

    pairs = [await _pair() for _ in range(9)]
    try:
        async with trio.open_nursery() as n:
            for stream, peer in pairs[:8]:
                n.start_soon(partial(trio.to_thread.run_sync, trickle, peer, abandon_on_cancel=True))
                n.start_soon(_sendfile, stream.socket, fd, 0, SIZE)
            await trio.sleep(1.0)
            stream, peer = pairs[8]

            def drain() -> int:
                got = 0
                while got < (1 << 20):
                    chunk = peer.recv(1 << 20)
                    if not chunk:
                        break
                    got += len(chunk)
                return got

            n.start_soon(partial(trio.to_thread.run_sync, drain, abandon_on_cancel=True))
            with trio.move_on_after(30) as scope:
                await _sendfile(stream.socket, fd, 0, 1 << 20)
            assert not scope.cancelled_caught, "the fast peer's piece waited behind the slow readers"
            stop = True
            n.cancel_scope.cancel()
    finally:
        stop = True
        os.close(fd)
        for stream, peer in pairs:
            await stream.aclose()
            peer.close()
