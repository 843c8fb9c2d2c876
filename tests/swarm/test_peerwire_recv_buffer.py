"""The piece channel's receive buffer: the IO layer allocates it without zero-filling,
and the protocol still hands out only buffers that the payload filled completely."""

from __future__ import annotations

import os

import pytest

from autoglm.node._peerwire import _page_aligned, _uninitialised
from autoglm.node._staging import DIRECT_ALIGN, _aligned
from autoglm.protocol import LocalProtocolError
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._peerwire import Codec, PeerwireClient, PeerwireServer, PieceReceived, Welcome

MID = b"\x01" * 32
PIECE = os.urandom(300_000)


def _owed_payload(split: int) -> tuple[PeerwireClient, bytes, int]:
    cli, srv = PeerwireClient(), PeerwireServer()
    srv.receive_data(cli.auth(b"k" * 32) + cli.request(1, MID, 0, len(PIECE), accept_zstd=False))
    while srv.next_event() is not NEED_DATA:
        pass
    cli.receive_data(srv.accept())
    assert cli.next_event() == Welcome()
    wire = srv.piece_header(1, Codec.RAW, len(PIECE)) + PIECE
    head = len(wire) - len(PIECE)
    cli.receive_data(wire[: head + split])
    assert cli.next_event() is NEED_DATA
    return cli, wire, head


def test_uninitialised_buffers_are_writable_bytearrays_of_the_size_asked() -> None:
    for n in (0, 1, 4096, 8 << 20):
        b = _uninitialised(n)
        assert type(b) is bytearray and len(b) == n
        b[-1:] = b"x" if n else b""
    with pytest.raises(MemoryError):
        _uninitialised(1 << 62)


def test_page_aligned_buffers_start_on_a_direct_io_boundary() -> None:
    # The store writes such a buffer with O_DIRECT as it is (no bounce copy): node/_staging.py
    for n in (0, 1, 4096, 300_000, 8 << 20):
        for _ in range(3):  # whatever alignment malloc happened to return
            b = _page_aligned(n)
            assert len(b) == n and not b.readonly
            if n > DIRECT_ALIGN:
                assert _aligned(b) and _aligned(b[DIRECT_ALIGN:]) and not _aligned(b[1:])
            if n:
                b[-1:] = b"x"
    for at in (1264, 263408, 4095, 1 << 30):  # where pieces start in a safetensors file
        b = _page_aligned(300_000, at)
        head = -at % DIRECT_ALIGN  # the bytes before the file's next 4 KiB boundary
        assert len(b) == 300_000 and _aligned(b[head:]) and not _aligned(b[head + 1 :])


@pytest.mark.parametrize("alloc", [_uninitialised, _page_aligned])
def test_body_into_page_aligned(alloc: object) -> None:
    cli, wire, head = _owed_payload(1)
    started = cli.start_body_into(alloc)  # type: ignore[arg-type]
    assert started is not None
    buf, filled = started
    buf[filled:] = wire[head + filled :]
    got = cli.body_filled()
    assert bytes(got.data) == PIECE and got.wire_bytes == len(PIECE)


@pytest.mark.parametrize("split", [0, 1, 4097])
def test_body_into_with_the_uninitialised_allocator(split: int) -> None:
    cli, wire, head = _owed_payload(split)
    asked: list[int] = []

    def alloc(n: int) -> bytearray:
        asked.append(n)
        b = _uninitialised(n)
        b[:] = b"\xaa" * n  # whatever the heap held: the payload must overwrite all of it
        return b

    started = cli.start_body_into(alloc)
    assert started is not None and asked == [len(PIECE)]
    buf, filled = started
    assert filled == split and bytes(buf[:split]) == PIECE[:split]
    buf[filled:] = wire[head + split :]
    assert cli.body_filled() == PieceReceived(1, MID, 0, bytearray(PIECE), len(PIECE))


def test_an_allocator_of_the_wrong_size_is_refused() -> None:
    cli, _, _ = _owed_payload(10)
    with pytest.raises(LocalProtocolError):
        cli.start_body_into(lambda n: bytearray(n - 1))

