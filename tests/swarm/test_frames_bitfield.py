"""Frames and bitfields: whole input, byte at a time, limits, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm.protocol import LocalProtocolError, RemoteProtocolError
from autoglm.protocol._bitfield import Bitfield
from autoglm.protocol._frames import NEED_DATA, FrameDecoder, encode_frame


def _drain(dec: FrameDecoder) -> list[bytes]:
    out = []
    while (f := dec.next_frame()) is not NEED_DATA:
        assert isinstance(f, bytes)
        out.append(f)
    return out


PAYLOADS = [b"", b"a", b"hello" * 100, bytes(range(256))]


def test_frames_whole_and_byte_at_a_time() -> None:
    wire = b"".join(encode_frame(p, 4096) for p in PAYLOADS)
    whole = FrameDecoder(4096)
    whole.receive_data(wire)
    assert _drain(whole) == PAYLOADS
    dec = FrameDecoder(4096)
    got: list[bytes] = []
    for i in range(len(wire)):
        dec.receive_data(wire[i : i + 1])
        got += _drain(dec)
    assert got == PAYLOADS


def test_frame_over_limit_refused_from_prefix_alone() -> None:
    dec = FrameDecoder(10)
    dec.receive_data((11).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError):
        dec.next_frame()
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * 11, 10)


def test_truncated_frame_at_eof() -> None:
    dec = FrameDecoder(100)
    dec.receive_data(encode_frame(b"abc", 100)[:-1])
    assert dec.next_frame() is NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        dec.next_frame()


def test_clean_eof_between_frames() -> None:
    dec = FrameDecoder(100)
    dec.receive_data(encode_frame(b"abc", 100))
    dec.receive_data(b"")
    assert dec.next_frame() == b"abc"
    assert dec.next_frame() is NEED_DATA


@given(st.binary(max_size=300))
def test_frame_fuzz_parse_or_remote_error(data: bytes) -> None:
    dec = FrameDecoder(64)
    dec.receive_data(data)
    dec.receive_data(b"")
    try:
        _drain(dec)
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize(
    "size, indices, wire",
    [
        (0, [], b""),
        (1, [0], b"\x80"),
        (8, [0, 7], b"\x81"),
        (9, [8], b"\x00\x80"),
        (12, range(12), b"\xff\xf0"),
    ],
)
def test_bitfield_table(size: int, indices: list[int], wire: bytes) -> None:
    bf = Bitfield(size, indices)
    assert bf.to_bytes() == wire
    assert Bitfield.from_bytes(wire, size) == bf
    assert list(bf) == list(indices)
    assert bf.complete == (len(list(indices)) == size)


def test_bitfield_full_matches_all_bits() -> None:
    for n in range(0, 20):
        assert Bitfield.full(n) == Bitfield(n, range(n))


@pytest.mark.parametrize("size, wire", [(9, b"\x00"), (9, b"\x00\x40"), (4, b"\x08"), (0, b"\x00")])
def test_bitfield_refuses_bad_wire(size: int, wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        Bitfield.from_bytes(wire, size)


@given(st.integers(0, 100).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0)), max_size=n))))
def test_bitfield_roundtrip(case: tuple[int, set[int]]) -> None:
    n, idx = case
    idx = {i for i in idx if i < n}
    bf = Bitfield(n, idx)
    assert set(bf) == idx and len(bf) == len(idx)
    assert Bitfield.from_bytes(bf.to_bytes(), n) == bf
    for i in idx:
        assert bf.discard(i)
    assert len(bf) == 0
