"""Uploads stay cached a few seconds for the next peer, then leave the page cache (node/_dropbehind.py).

Residency is read with util-linux's ``fincore`` (mincore(2)); skipped where it is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from autoglm.node import _peerwire
from autoglm.node._dropbehind import RecentlyServed

PIECE = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pieces(tmp_path: Path) -> list[Path]:
    """Four 1 MiB files, durable and not cached."""
    out = []
    for k in range(4):
        p = tmp_path / f"p{k}"
        with open(p, "wb") as f:
            f.write(os.urandom(PIECE))
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, PIECE, os.POSIX_FADV_DONTNEED)
        out.append(p)
    if _resident(out[0]):
        pytest.skip("the page cache of this filesystem cannot be dropped (tmpfs)")
    return out


def _upload(served: RecentlyServed, path: Path, now: float) -> None:
    """What a sending thread does: read the range (sendfile caches it), hand it over, close its fd."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, PIECE, 0)
        served.sent(fd, 0, PIECE, now)
    finally:
        os.close(fd)


def test_a_range_stays_cached_until_newer_uploads_push_it_out(pieces: list[Path]) -> None:
    before = _fds()
    served = RecentlyServed(keep_bytes=2 * PIECE, keep_s=5.0)
    _upload(served, pieces[0], 0.0)
    _upload(served, pieces[1], 0.1)
    assert _resident(pieces[0]) == PIECE and _resident(pieces[1]) == PIECE
    _upload(served, pieces[0], 0.2)  # asked for again: now the newest, kept once
    _upload(served, pieces[2], 0.3)  # over 2 MiB: the oldest (piece 1) goes
    assert _resident(pieces[1]) == 0
    assert _resident(pieces[0]) == PIECE and _resident(pieces[2]) == PIECE
    assert len(served) == 2
    served.clear()
    assert _resident(pieces[0]) == 0 and _resident(pieces[2]) == 0
    assert _fds() == before  # every duplicate fd closed


def test_a_range_nobody_asks_for_again_is_dropped_after_keep_s(pieces: list[Path]) -> None:
    before = _fds()
    served = RecentlyServed(keep_bytes=64 * PIECE, keep_s=5.0)
    _upload(served, pieces[0], 10.0)
    _upload(served, pieces[1], 12.0)
    served.expire(14.9)
    assert _resident(pieces[0]) == PIECE
    served.expire(15.0)
    assert _resident(pieces[0]) == 0 and _resident(pieces[1]) == PIECE
    served.expire(17.0)
    assert _resident(pieces[1]) == 0 and len(served) == 0
    assert _fds() == before


async def test_a_range_a_server_sent_stays_for_the_next_peer(pieces: list[Path]) -> None:
    """``_sendfile`` in a peerwire server's context hands the range to its RecentlyServed."""
    srv = socket.create_server(("127.0.0.1", 0))
    stream = await trio.open_tcp_stream("127.0.0.1", srv.getsockname()[1])
    peer, _ = srv.accept()
    srv.close()
    fd = os.open(pieces[3], os.O_RDONLY)
    served = RecentlyServed()
    token = _peerwire._SERVED.set(served)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, lambda: peer.recv(PIECE, socket.MSG_WAITALL))
            await _peerwire._sendfile(stream.socket, fd, 0, PIECE)
        assert _resident(pieces[3]) == PIECE and len(served) == 1
        served.clear()  # (the drop itself: the tests above; here pages may still wait in TCP's queue for an ACK)
        assert len(served) == 0
    finally:
        _peerwire._SERVED.reset(token)
        os.close(fd)
        await stream.aclose()
        peer.close()
