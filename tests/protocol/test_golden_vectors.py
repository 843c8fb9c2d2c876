"""Golden vectors: fixed manifests encode to the same bytes, id and signature forever.

The files in tests/vectors/ were written once from the values built here (see
tests/vectors/README.md). If a test here fails, the manifest format changed:
that needs a new format version, not new vectors.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import blake3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm.protocol import (
    FileEntry,
    Manifest,
    Piece,
    Requirements,
    TrustPolicy,
    Variant,
    decode_manifest,
    decode_signed_manifest,
    key_id,
    sign_manifest,
    verify_manifest,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def fixed_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _raw_pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _entry(path: str, data: bytes, max_piece: int) -> FileEntry:
    pieces = tuple(
        Piece(o, len(data[o : o + max_piece]), blake3.blake3(data[o : o + max_piece]).digest())
        for o in range(0, len(data), max_piece)
    )
    return FileEntry(path, len(data), hashlib.sha256(data).digest(), pieces)


def tiny_manifest() -> Manifest:
    """Every field in use: two files, three pieces in one, a variant, a parent."""
    config = b'{"model_type":"tiny"}\n'
    weights = bytes(range(40))
    return Manifest(
        name="example/tiny-model",
        version="1.0.0",
        created_at=1_700_000_000,
        publisher=key_id(_raw_pub(fixed_key())),
        files=(_entry("config.json", config, 16), _entry("weights/model.safetensors", weights, 16)),
        variants=(
            Variant(
                "fp16",
                ("config.json", "weights/model.safetensors"),
                Requirements(min_ram=1 << 30, min_accel_mem=2 << 30, accel="cuda", dtype="F16"),
            ),
        ),
        parent=hashlib.sha256(b"autoglm-node test parent").digest(),
        max_piece_size=16,
    )


def minimal_manifest() -> Manifest:
    """The fewest fields: one empty file, no variants, no parent, default piece size."""
    return Manifest(
        name="m",
        version="0",
        created_at=0,
        publisher=key_id(_raw_pub(fixed_key())),
        files=(_entry("empty", b"", 1 << 23),),
    )


BUILDERS = {"tiny": tiny_manifest, "minimal": minimal_manifest}


def _meta() -> dict[str, dict[str, str]]:
    return json.loads((VECTORS / "manifest-v1.json").read_text())


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_manifest_encodes_to_golden_bytes(name: str) -> None:
    golden = (VECTORS / f"manifest-v1-{name}.bin").read_bytes()
    m = BUILDERS[name]()
    assert m.encode() == golden
    assert m.id.hex() == _meta()[name]["id"]
    assert hashlib.sha256(golden).hexdigest() == _meta()[name]["id"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_golden_bytes_decode_to_manifest(name: str) -> None:
    golden = (VECTORS / f"manifest-v1-{name}.bin").read_bytes()
    m = decode_manifest(golden)
    assert m == BUILDERS[name]()
    assert m.encode() == golden


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_signed_envelope_is_deterministic(name: str) -> None:
    meta = _meta()[name]
    key = fixed_key()
    assert _raw_pub(key).hex() == meta["public_key"]
    signed = sign_manifest(BUILDERS[name](), key)
    assert signed.signature.hex() == meta["signature"]
    assert signed.encode() == (VECTORS / f"manifest-v1-{name}.agm").read_bytes()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_golden_envelope_verifies(name: str) -> None:
    data = (VECTORS / f"manifest-v1-{name}.agm").read_bytes()
    signed = decode_signed_manifest(data)
    pub = bytes.fromhex(_meta()[name]["public_key"])
    m = verify_manifest(signed, TrustPolicy(keys=frozenset({pub})), NOW)
    assert m == BUILDERS[name]()
    assert signed.signer == key_id(pub)
    assert signed.encode() == data


def test_golden_bytes_spot_checks() -> None:
    """A few bytes a reader of docs/manifest.md can check by hand."""
    golden = (VECTORS / "manifest-v1-minimal.bin").read_bytes()
    # fixmap of 8 entries; the first key in UTF-8 order is "created_at" = 0.
    assert golden[0] == 0x88
    assert golden[1:12] == b"\xaacreated_at"
    assert golden[12] == 0x00
    env = (VECTORS / "manifest-v1-minimal.agm").read_bytes()
    assert env.startswith(b"\x89AGM\r\n\x1a\n")
