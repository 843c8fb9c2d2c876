"""Canonical msgpack: round trips, and every non-canonical encoding refused."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from manifest_strategies import canonical_values

from autoglm.protocol import (
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    decode_canonical,
    encode_canonical,
)
from autoglm.protocol._codec import MAX_DEPTH


@given(canonical_values)
def test_round_trip(value: object) -> None:
    data = encode_canonical(value)
    back = decode_canonical(data)
    assert back == value
    assert encode_canonical(back) == data


@given(st.dictionaries(st.text(max_size=6, alphabet="aAbe\u0301z0\uff21\U0001f600"), st.integers(0, 9), min_size=2, max_size=6))
def test_map_keys_sorted_by_utf8_bytes(d: dict[str, int]) -> None:
    data = encode_canonical(d)
    keys = list(msgpack.unpackb(data, raw=False).keys())
    assert keys == sorted(d, key=lambda k: k.encode())


def test_insertion_order_does_not_matter() -> None:
    assert encode_canonical({"b": 1, "a": 2}) == encode_canonical({"a": 2, "b": 1})


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x82\xa1b\x01\xa1a\x02", "map keys out of order"),
        (b"\xcc\x05", "uint8 for a fixint"),
        (b"\xcd\x00\x05", "uint16 for a fixint"),
        (b"\xce\x00\x00\x01\x00", "uint32 for a uint16"),
        (b"\xd0\x01", "int8 for a positive fixint"),
        (b"\xd1\xff\xff", "int16 for a negative fixint"),
        (b"\xd9\x01a", "str8 for a fixstr"),
        (b"\xda\x00\x01a", "str16 for a fixstr"),
        (b"\xdc\x00\x01\x01", "array16 for a fixarray"),
        (b"\xde\x00\x01\xa1a\x01", "map16 for a fixmap"),
        (b"\xca\x3f\x80\x00\x00", "a float32"),
        (b"\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00", "a float64"),
        (b"\xd4\x01\x00", "an extension type"),
        (b"\x81\x01\x02", "an integer map key"),
        (b"\x81\xc4\x01a\x01", "a bytes map key"),
        (b"\x82\xa1a\x01\xa1a\x02", "a duplicate map key"),
        (b"\x01\x02", "trailing bytes"),
        (b"", "no bytes"),
        (b"\x92\x01", "a truncated array"),
        (b"\xa2\xff\xfe", "invalid UTF-8 in a str"),
    ],
)
def test_non_canonical_refused(data: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_canonical(data)


def test_bytes_use_bin_family_and_text_str_family() -> None:
    assert encode_canonical(b"a") == b"\xc4\x01a"
    assert encode_canonical("a") == b"\xa1a"
    assert encode_canonical(5) == b"\x05"
    assert encode_canonical(-1) == b"\xff"
    assert encode_canonical(256) == b"\xcd\x01\x00"


def test_nesting_is_capped_without_recursion_error() -> None:
    ok = b"\x91" * MAX_DEPTH + b"\xc0"
    assert decode_canonical(ok) is not None
    for depth in (MAX_DEPTH + 1, 500, 1000, 1023, 5000):
        with pytest.raises(RemoteProtocolError):
            decode_canonical(b"\x91" * depth + b"\xc0")


@pytest.mark.parametrize("value", [1.5, {1: 2}, {b"k": 1}, object(), 1 << 64, -(1 << 63) - 1, [set()]])
def test_encode_refuses_what_has_no_canonical_form(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_canonical(value)


@pytest.mark.parametrize(
    ("limits", "data"),
    [
        (Limits(max_bytes=3), encode_canonical("abcd")),
        (Limits(max_str_len=3), encode_canonical("abcd")),
        (Limits(max_bin_len=3), encode_canonical(b"abcd")),
        (Limits(max_array_len=3), encode_canonical([1, 2, 3, 4])),
        (Limits(max_map_len=1), encode_canonical({"a": 1, "b": 2})),
    ],
)
def test_limits_refused(limits: Limits, data: bytes) -> None:
    decode_canonical(data)
    with pytest.raises(RemoteProtocolError):
        decode_canonical(data, limits)
