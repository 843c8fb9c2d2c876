"""Compressed pieces: decompression is bounded by the signed piece length, never by the frame.

A peer answering a piece request chooses the zstd frame. Whatever its header
claims (a content size of 64 MiB or 1 TiB, no content size at all, a huge
window), the client allocates at most about one piece, and a bad frame is a
RemoteProtocolError for that connection: never MemoryError, never a crash of
the fetch.
"""

from __future__ import annotations

import struct
import tracemalloc

import pytest
import trio
import zstandard

from autoglm.node._peerwire import PeerwireConnection, SourceError
from autoglm.node._ratelimit import RateLimiter
from autoglm.protocol import RemoteProtocolError
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._peerwire import Codec, PeerwireClient, PeerwireServer, PieceReceived, Welcome

MID = b"m" * 32
PIECE = 1 << 20


def _bomb_with_size(n: int) -> bytes:
    return zstandard.ZstdCompressor(level=19, write_content_size=True).compress(b"\0" * n)


def _bomb_no_size(n: int) -> bytes:
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=False)
    obj = cctx.compressobj()
    out = b"".join(obj.compress(b"\0" * (1 << 20)) for _ in range(n >> 20))
    return out + obj.flush()


def _tiny_claims_tib() -> bytes:
    # magic, descriptor (8-byte content size, single segment), content size 2**40,
    # then one last RLE block of 128 KiB of zeros: 17 bytes that claim a terabyte.
    block = (1 | (1 << 1) | ((128 << 10) << 3)).to_bytes(3, "little")
    return struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", 1 << 40) + block + b"\0"


def _client_with(payload: bytes, length: int = PIECE) -> PeerwireClient:
    cli, srv = PeerwireClient(), PeerwireServer()
    srv.receive_data(cli.auth(b"k" * 32) + cli.request(1, MID, 0, length))
    srv.next_event()
    down = srv.accept()
    srv.next_event()
    cli.receive_data(down + srv.piece_header(1, Codec.ZSTD, len(payload)) + payload)
    assert isinstance(cli.next_event(), Welcome)
    return cli


@pytest.mark.parametrize("payload", [
    pytest.param(_bomb_with_size(64 << 20), id="64MiB-declared"),
    pytest.param(_bomb_no_size(64 << 20), id="64MiB-undeclared"),
    pytest.param(_tiny_claims_tib(), id="1TiB-declared"),
    pytest.param(_bomb_with_size(PIECE - 1), id="one-byte-short"),
    pytest.param(_bomb_with_size(PIECE + 1), id="one-byte-long"),
])
def test_bomb_is_a_protocol_error_with_bounded_memory(payload: bytes) -> None:
    assert len(payload) < PIECE
    cli = _client_with(payload)
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            cli.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * PIECE, peak


def test_honest_compressed_piece_still_decodes() -> None:
    data = bytes(range(256)) * (PIECE // 256)
    packed = zstandard.ZstdCompressor(level=3).compress(data)
    cli = _client_with(packed)
    ev = cli.next_event()
    assert isinstance(ev, PieceReceived) and bytes(ev.data) == data
    assert cli.next_event() is NEED_DATA


def test_streamed_frame_without_size_decodes() -> None:
    data = b"ab" * (PIECE // 2)
    obj = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
    packed = obj.compress(data) + obj.flush()
    ev = _client_with(packed).next_event()
    assert isinstance(ev, PieceReceived) and bytes(ev.data) == data


async def test_bomb_over_a_real_socket_fails_only_that_connection() -> None:
    """A real TCP peer sends the 1 TiB frame: the fetch gets a SourceError (penalise that peer)."""
    bomb = _tiny_claims_tib()

    async def serve(stream: trio.SocketStream) -> None:
        srv = PeerwireServer()
        while True:
            ev = srv.next_event()
            if ev is NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                srv.receive_data(data)
                continue
            if ev.__class__.__name__ == "Auth":
                await stream.send_all(srv.accept())
            else:
                await stream.send_all(srv.piece_header(ev.req_id, Codec.ZSTD, len(bomb)) + bomb)  # type: ignore[union-attr]

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = PeerwireConnection(stream, RateLimiter(None))
        with trio.fail_after(10):
            await conn._handshake(b"k" * 32, None)
            with pytest.raises(SourceError):
                await conn.fetch(MID, 0, PIECE)
        assert conn.broken
        await conn.aclose()
        nursery.cancel_scope.cancel()
