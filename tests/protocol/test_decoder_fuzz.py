"""Fuzz rule: the decoders parse their input or raise RemoteProtocolError, never anything else."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from manifest_strategies import canonical_values, manifests

from autoglm.protocol import (
    MAGIC,
    FileEntry,
    Manifest,
    Piece,
    RemoteProtocolError,
    Variant,
    decode_canonical,
    decode_manifest,
    decode_signed_manifest,
    encode_canonical,
    key_id,
    sign_manifest,
)

KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz").digest())
PUB = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
H = hashlib.sha256(b"h").digest()
MANIFEST = Manifest(
    "fuzz/model",
    "2.0",
    7,
    key_id(PUB),
    (
        FileEntry("a/b.safetensors", 5, H, (Piece(0, 4, H), Piece(4, 1, H))),
        FileEntry("c.json", 0, H, ()),
    ),
    (Variant("v", ("c.json",)),),
    H,
    4,
)
ENVELOPE = sign_manifest(MANIFEST, KEY).encode()
Decoder = Callable[[bytes], Any]
DECODERS: dict[str, Decoder] = {
    "canonical": decode_canonical,
    "manifest": decode_manifest,
    "envelope": decode_signed_manifest,
}


def parses_or_protocol_error(decode: Decoder, data: bytes) -> bool:
    """True if it parsed. RemoteProtocolError is the only allowed failure."""
    try:
        decode(data)
    except RemoteProtocolError:
        return False
    return True


@pytest.mark.parametrize("which", sorted(DECODERS))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300))
def test_random_bytes(which: str, data: bytes) -> None:
    parses_or_protocol_error(DECODERS[which], data)


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_random_bytes_after_magic(data: bytes) -> None:
    parses_or_protocol_error(decode_signed_manifest, MAGIC + data)


@settings(max_examples=200)
@given(value=canonical_values)
def test_wellformed_msgpack_of_the_wrong_shape(value: Any) -> None:
    data = encode_canonical(value)
    parses_or_protocol_error(decode_manifest, data)
    parses_or_protocol_error(decode_signed_manifest, MAGIC + data)


@settings(max_examples=300)
@given(st.data())
def test_mutated_envelopes(data: st.DataObject) -> None:
    buf = bytearray(ENVELOPE)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(buf) - 1))
        if op == "set":
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del buf[pos : pos + data.draw(st.integers(1, 4))]
    parses_or_protocol_error(decode_signed_manifest, bytes(buf))


@settings(max_examples=50, deadline=None)
@given(m=manifests())
def test_every_truncation_of_generated_manifests(m: Manifest) -> None:
    data = m.encode()
    for n in range(0, len(data), max(1, len(data) // 64)):
        assert not parses_or_protocol_error(decode_manifest, data[:n])


def test_every_truncation_prefix_of_a_valid_envelope() -> None:
    assert parses_or_protocol_error(decode_signed_manifest, ENVELOPE)
    for n in range(len(ENVELOPE)):
        assert not parses_or_protocol_error(decode_signed_manifest, ENVELOPE[:n]), n


def test_every_truncation_prefix_of_a_valid_manifest() -> None:
    body = MANIFEST.encode()
    assert decode_manifest(body) == MANIFEST
    for n in range(len(body)):
        assert not parses_or_protocol_error(decode_manifest, body[:n]), n


# Every msgpack type tag family, boundaries of the fixint/fixstr ranges, and a few others.
_SUBSTITUTES = sorted({*range(0xC0, 0x100), 0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0x20, 0x2F, 0x41})


def test_every_position_with_every_type_tag() -> None:
    """One-byte substitutions of the small manifest at every position."""
    body = MANIFEST.encode()
    parsed = 0
    for pos in range(len(body)):
        buf = bytearray(body)
        for v in _SUBSTITUTES:
            buf[pos] = v
            parsed += parses_or_protocol_error(decode_manifest, bytes(buf))
    # Changing a hash byte or a label character still gives a valid (different) manifest.
    assert parsed > len(body)


@pytest.mark.parametrize(
    "data",
    [
        b"\x91" * 100_000,
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        MAGIC + b"\x85" + b"\xa1v\x01" * 5,
        MAGIC + b"\x91" * 1000 + b"\xc0",
        b"\x81\xa1a" * 1000 + b"\xc0",
    ],
    ids=["deep", "huge-array", "huge-map", "huge-str", "huge-bin", "dup-keys", "deep-envelope", "deep-maps"],
)
def test_hostile_headers(data: bytes) -> None:
    for decode in DECODERS.values():
        assert not parses_or_protocol_error(decode, data)


def _paths_in(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path into a decoded value, so a test can replace any node of it."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths_in(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths_in(v, (*prefix, i))
    return out


RAW = MANIFEST.to_value()
RAW_PATHS = _paths_in(RAW)[1:]


@settings(max_examples=400)
@given(where=st.sampled_from(RAW_PATHS), value=canonical_values)
def test_any_field_replaced_by_any_value(where: tuple[Any, ...], value: Any) -> None:
    """Type confusion anywhere in the tree is refused as a protocol error."""
    raw = decode_canonical(encode_canonical(RAW))
    node = raw
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = value
    parses_or_protocol_error(decode_manifest, encode_canonical(raw))
