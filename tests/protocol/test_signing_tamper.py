"""Signed envelopes: any flipped byte, wrong or untrusted key, or truncation fails loudly."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.protocol import (
    DOMAIN_MANIFEST,
    MAGIC,
    AutoglmError,
    FileEntry,
    LocalProtocolError,
    Manifest,
    Piece,
    RemoteProtocolError,
    SignatureError,
    SignedManifest,
    TrustError,
    TrustPolicy,
    decode_signed_manifest,
    encode_public_key,
    key_id,
    parse_private_key,
    parse_public_key,
    sign_manifest,
    verify_manifest,
    verify_signature,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
H = hashlib.sha256(b"x").digest()


def raw_pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"signing-test").digest())


def small_manifest(key: Ed25519PrivateKey) -> Manifest:
    return Manifest(
        name="m",
        version="1",
        created_at=5,
        publisher=key_id(raw_pub(key)),
        files=(FileEntry("a", 3, H, (Piece(0, 2, H), Piece(2, 1, H))),),
        max_piece_size=2,
    )


@pytest.fixture(scope="module")
def envelope(key: Ed25519PrivateKey) -> bytes:
    return sign_manifest(small_manifest(key), key).encode()


def load_and_verify(data: bytes, policy: TrustPolicy) -> Manifest:
    return verify_manifest(decode_signed_manifest(data), policy, NOW)


def test_good_envelope_verifies(key: Ed25519PrivateKey, envelope: bytes) -> None:
    m = load_and_verify(envelope, TrustPolicy(keys=frozenset({raw_pub(key)})))
    assert m == small_manifest(key)


def test_every_single_byte_flip_fails(key: Ed25519PrivateKey, envelope: bytes) -> None:
    policy = TrustPolicy(keys=frozenset({raw_pub(key)}))
    assert len(envelope) < 400
    for pos in range(len(envelope)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(envelope)
            bad[pos] ^= mask
            try:
                load_and_verify(bytes(bad), policy)
            except AutoglmError:
                continue
            pytest.fail(f"flipping byte {pos} with {mask:#x} still verifies")


def test_flip_inside_signed_bytes_is_a_signature_error(key: Ed25519PrivateKey, envelope: bytes) -> None:
    """A flip in a piece hash keeps the manifest well-formed: only the signature catches it."""
    policy = TrustPolicy(keys=frozenset({raw_pub(key)}))
    pos = envelope.index(H)
    bad = bytearray(envelope)
    bad[pos] ^= 1
    with pytest.raises(SignatureError, match="signature does not verify"):
        load_and_verify(bytes(bad), policy)


def test_signature_flip_is_a_signature_error(key: Ed25519PrivateKey, envelope: bytes) -> None:
    signed = decode_signed_manifest(envelope)
    bad = envelope.replace(signed.signature, bytes([signed.signature[0] ^ 1]) + signed.signature[1:])
    with pytest.raises(SignatureError, match="signature does not verify"):
        load_and_verify(bad, TrustPolicy(keys=frozenset({raw_pub(key)})))


def test_wrong_key_fails(key: Ed25519PrivateKey) -> None:
    """Another key's signature over a manifest that names our key id as publisher."""
    other = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"other").digest())
    m = small_manifest(key)
    forged = SignedManifest(m, raw_pub(key), other.sign(DOMAIN_MANIFEST + m.encode()))
    with pytest.raises(SignatureError, match="signature does not verify"):
        load_and_verify(forged.encode(), TrustPolicy(keys=frozenset({raw_pub(key)})))


def test_signer_key_swapped_fails(key: Ed25519PrivateKey) -> None:
    """The envelope carries a key that is not the manifest's publisher."""
    other = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"other").digest())
    m = small_manifest(key)
    swapped = SignedManifest(m, raw_pub(other), other.sign(DOMAIN_MANIFEST + m.encode()))
    with pytest.raises(SignatureError, match="publisher id does not match the signing key"):
        load_and_verify(swapped.encode(), TrustPolicy(keys=frozenset({raw_pub(other)})))


def test_untrusted_key_fails(key: Ed25519PrivateKey, envelope: bytes) -> None:
    other = raw_pub(Ed25519PrivateKey.generate())
    with pytest.raises(TrustError, match=f"publisher key {key_id(raw_pub(key))} is not trusted"):
        load_and_verify(envelope, TrustPolicy(keys=frozenset({other})))


def test_no_trust_configured_says_how_to_fix(envelope: bytes) -> None:
    with pytest.raises(TrustError, match="no trusted publisher keys are configured; pass --trust"):
        load_and_verify(envelope, TrustPolicy())


def test_signature_from_another_domain_fails(key: Ed25519PrivateKey) -> None:
    m = small_manifest(key)
    other_domain = SignedManifest(m, raw_pub(key), key.sign(b"autoglm-node/name/v1\x00" + m.encode()))
    with pytest.raises(SignatureError):
        load_and_verify(other_domain.encode(), TrustPolicy(keys=frozenset({raw_pub(key)})))
    bare = SignedManifest(m, raw_pub(key), key.sign(m.encode()))
    with pytest.raises(SignatureError):
        load_and_verify(bare.encode(), TrustPolicy(keys=frozenset({raw_pub(key)})))


def test_every_truncation_fails_as_malformed(envelope: bytes) -> None:
    for n in range(len(envelope)):
        with pytest.raises(RemoteProtocolError):
            decode_signed_manifest(envelope[:n])


def test_truncation_message_is_meaningful(envelope: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed msgpack"):
        decode_signed_manifest(envelope[: len(envelope) // 2])
    with pytest.raises(RemoteProtocolError, match="bad magic bytes"):
        decode_signed_manifest(envelope[:4])
    with pytest.raises(RemoteProtocolError, match="bad magic bytes"):
        decode_signed_manifest(b"")


def test_html_instead_of_manifest_gets_a_hint() -> None:
    with pytest.raises(RemoteProtocolError, match="looks like HTML"):
        decode_signed_manifest(b"<!doctype html><title>404</title>")


def test_trailing_bytes_refused(envelope: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_signed_manifest(envelope + b"\x00")


def test_sign_refuses_a_manifest_of_another_publisher(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(LocalProtocolError, match="publisher"):
        sign_manifest(small_manifest(key), other)


def test_verify_signature_raises_and_never_returns_false(key: Ed25519PrivateKey) -> None:
    sig = key.sign(DOMAIN_MANIFEST + b"msg")
    assert verify_signature(raw_pub(key), sig, DOMAIN_MANIFEST, b"msg") is None
    with pytest.raises(SignatureError):
        verify_signature(raw_pub(key), sig, DOMAIN_MANIFEST, b"msh")
    with pytest.raises(SignatureError):
        verify_signature(raw_pub(key), sig[:63], DOMAIN_MANIFEST, b"msg")


def test_public_key_formats(key: Ed25519PrivateKey) -> None:
    pem = encode_public_key(key)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert parse_public_key(pem) == raw_pub(key)
    assert parse_public_key(raw_pub(key).hex().encode() + b"\n") == raw_pub(key)
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert parse_public_key(priv_pem) == raw_pub(key)
    assert raw_pub(parse_private_key(priv_pem)) == raw_pub(key)
    with pytest.raises(LocalProtocolError, match="not an Ed25519 public key"):
        parse_public_key(b"garbage")
    with pytest.raises(LocalProtocolError):
        parse_private_key(pem)


def test_key_id_is_stable() -> None:
    assert key_id(bytes(32)) == hashlib.sha256(b"autoglm-node/key/v1\x00" + bytes(32)).hexdigest()[:32]
    with pytest.raises(LocalProtocolError):
        key_id(bytes(31))


def test_magic_is_png_style() -> None:
    assert MAGIC == b"\x89AGM\r\n\x1a\n"
