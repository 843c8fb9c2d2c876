"""Peerwire sans-IO: client and server objects talking through byte strings."""

from __future__ import annotations

import blake3
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from autoglm.protocol import IntegrityError, LocalProtocolError, RemoteProtocolError
from autoglm.protocol._frames import NEED_DATA
from autoglm.protocol._peerwire import (
    Auth,
    Codec,
    PeerwireClient,
    PeerwireServer,
    PieceReceived,
    Rejected,
    RejectReason,
    Request,
    Welcome,
    maybe_compress,
    verify_piece,
)

MID = b"m" * 32
PIECES = [bytes([i]) * 1000 for i in range(4)] + [blake3.blake3(b"x").digest(length=3000)]


def _all(obj: PeerwireClient | PeerwireServer) -> list[object]:
    out = []
    while (e := obj.next_event()) is not NEED_DATA:
        out.append(e)
    return out


def _serve(srv: PeerwireServer, req: Request) -> bytes:
    if req.index >= len(PIECES):
        return srv.reject(req.req_id, RejectReason.NOT_HAVE)
    codec, body = maybe_compress(PIECES[req.index]) if req.accept_zstd else (Codec.RAW, PIECES[req.index])
    return srv.piece_header(req.req_id, codec, len(body)) + body


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_transfer(byte_at_a_time: bool) -> None:
    cli, srv = PeerwireClient(), PeerwireServer()
    up = cli.auth(b"k" * 32) + b"".join(
        cli.request(i + 1, MID, i, len(PIECES[i]) if i < len(PIECES) else 10, accept_zstd=i % 2 == 0)
        for i in range(len(PIECES) + 1)
    )
    srv.receive_data(up)
    evs = _all(srv)
    assert evs[0] == Auth(b"k" * 32)
    assert evs[1:] == []  # nothing more until accept()
    down = srv.accept()
    reqs = _all(srv)
    assert [r.index for r in reqs if isinstance(r, Request)] == list(range(len(PIECES) + 1))
    down += b"".join(_serve(srv, r) for r in reqs if isinstance(r, Request))
    got: list[object] = []
    if byte_at_a_time:
        for i in range(len(down)):
            cli.receive_data(down[i : i + 1])
            got += _all(cli)
    else:
        cli.receive_data(down)
        got = _all(cli)
    assert got[0] == Welcome()
    pieces = [e for e in got if isinstance(e, PieceReceived)]
    assert [p.data for p in pieces] == PIECES
    assert pieces[0].wire_bytes < 1000  # zstd used where it shrinks
    assert pieces[4].wire_bytes == 3000  # random bytes go raw
    assert got[-1] == Rejected(len(PIECES) + 1, RejectReason.NOT_HAVE, MID, len(PIECES))
    assert cli.in_flight == 0


def test_request_before_auth_refused() -> None:
    srv = PeerwireServer()
    cli = PeerwireClient()
    cli.auth(b"k" * 16)
    srv.receive_data(cli.request(1, MID, 0, 10))
    with pytest.raises(RemoteProtocolError):
        srv.next_event()


def test_bad_token_refusal_reaches_client() -> None:
    cli, srv = PeerwireClient(), PeerwireServer()
    srv.receive_data(cli.auth(b"bad" * 6))
    assert isinstance(srv.next_event(), Auth)
    cli.receive_data(srv.refuse())
    assert cli.next_event() == Rejected(0, RejectReason.BAD_TOKEN)


@pytest.mark.parametrize(
    "header_len, codec",
    [(999, Codec.RAW), (1001, Codec.RAW), (1001, Codec.ZSTD)],
)
def test_wrong_payload_length_refused(header_len: int, codec: Codec) -> None:
    cli, srv = PeerwireClient(), PeerwireServer()
    cli.auth(b"k" * 16)
    cli.request(1, MID, 0, 1000)
    cli.receive_data(srv.piece_header(1, codec, header_len))
    with pytest.raises(RemoteProtocolError):
        cli.next_event()


def test_zstd_bomb_refused() -> None:
    cli, srv = PeerwireClient(), PeerwireServer()
    cli.auth(b"k" * 16)
    cli.request(1, MID, 0, 1000)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 10_000_000)
    cli.receive_data(srv.piece_header(1, Codec.ZSTD, len(bomb)) + bomb)
    with pytest.raises(RemoteProtocolError):
        cli.next_event()


def test_unsolicited_piece_refused() -> None:
    cli, srv = PeerwireClient(), PeerwireServer()
    cli.auth(b"k" * 16)
    cli.receive_data(srv.piece_header(7, Codec.RAW, 1))
    with pytest.raises(RemoteProtocolError):
        cli.next_event()


def test_verify_piece() -> None:
    verify_piece(b"abc", blake3.blake3(b"abc").digest())
    with pytest.raises(IntegrityError):
        verify_piece(b"abd", blake3.blake3(b"abc").digest())


def test_local_misuse() -> None:
    cli = PeerwireClient()
    with pytest.raises(LocalProtocolError):
        cli.request(1, MID, 0, 1)
    cli.auth(b"k" * 16)
    cli.request(1, MID, 0, 1)
    with pytest.raises(LocalProtocolError):
        cli.request(1, MID, 0, 1)


@given(st.binary(max_size=300))
def test_fuzz_server(data: bytes) -> None:
    srv = PeerwireServer()
    srv.receive_data(data)
    try:
        for _ in range(50):
            e = srv.next_event()
            if isinstance(e, Auth):
                srv.accept()
            elif e is NEED_DATA:
                break
    except RemoteProtocolError:
        pass


@given(st.binary(max_size=300))
def test_fuzz_client(data: bytes) -> None:
    cli = PeerwireClient()
    cli.auth(b"k" * 16)
    for i in range(1, 5):
        cli.request(i, MID, i, 100)
    cli.receive_data(data)
    cli.receive_data(b"")
    try:
        for _ in range(50):
            if cli.next_event() is NEED_DATA:
                break
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize("split", [0, 1, 4, 17, 999])
def test_body_into_caller_buffer(split: int) -> None:
    """The zero-copy path: the caller reads the raw payload into the client's buffer itself."""
    cli, srv = PeerwireClient(), PeerwireServer()
    srv.receive_data(cli.auth(b"k" * 32) + cli.request(1, MID, 0, len(PIECES[0]), accept_zstd=False))
    _all(srv)
    cli.receive_data(srv.accept())
    assert _all(cli) == [Welcome()]
    (req,) = _all(srv)
    assert isinstance(req, Request)
    wire = srv.piece_header(1, Codec.RAW, len(PIECES[0])) + PIECES[0]
    head = len(wire) - len(PIECES[0])
    cli.receive_data(wire[: head + split])  # the header and the first `split` payload bytes
    assert cli.next_event() is NEED_DATA
    assert cli.body_remaining == len(PIECES[0]) - split
    started = cli.start_body_into()
    assert started is not None
    buf, filled = started
    assert filled == split and len(buf) == len(PIECES[0])
    with pytest.raises(LocalProtocolError):
        cli.next_event()  # the caller owns the payload until body_filled()
    buf[filled:] = wire[head + split :]
    got = cli.body_filled()
    assert got == PieceReceived(1, MID, 0, bytearray(PIECES[0]), len(PIECES[0]))
    assert cli.in_flight == 0 and cli.next_event() is NEED_DATA


def test_body_into_refuses_compressed_and_idle() -> None:
    cli = PeerwireClient()
    assert cli.start_body_into() is None
    with pytest.raises(LocalProtocolError):
        cli.body_filled()
    srv = PeerwireServer()
    srv.receive_data(cli.auth(b"k" * 32) + cli.request(1, MID, 1, len(PIECES[1])))
    _all(srv)
    cli.receive_data(srv.accept())
    _all(cli)
    codec, body = maybe_compress(PIECES[1])
    assert codec is Codec.ZSTD
    cli.receive_data(srv.piece_header(1, codec, len(body)))
    assert cli.next_event() is NEED_DATA
    assert cli.start_body_into() is None  # compressed payloads take the buffered path
