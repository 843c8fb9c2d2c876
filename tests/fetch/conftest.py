"""Fixtures for fetch tests: a published, signed sample model and a fault-injecting mirror."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from autoglm.node._publish import build_manifest
from autoglm.node._sample import write_sample_model
from autoglm.protocol import (
    SignedManifest,
    TrustPolicy,
    encode_public_key,
    generate_private_key,
    key_id,
    parse_public_key,
    sign_manifest,
)

from .faultserver import FaultServer

PIECE = 64 * 1024


@dataclass
class Published:
    root: Path  # the model files as published (and served)
    manifest_path: Path
    signed: SignedManifest
    trust: TrustPolicy
    pub_path: Path

    def assert_identical(self, out: Path) -> None:
        for f in self.signed.manifest.files:
            got = (out / f.path).read_bytes()
            assert got == (self.root / f.path).read_bytes(), f.path


def publish(tmp: Path, size: int = 1 << 20, piece: int = PIECE, seed: bytes = b"t") -> Published:
    root = tmp / "published"
    write_sample_model(root, size=size, seed=seed)
    key = generate_private_key()
    pub_pem = encode_public_key(key)
    raw = parse_public_key(pub_pem)
    m = build_manifest(root, name="test/model", version="1", publisher=key_id(raw), created_at=int(time.time()), max_piece=piece)
    signed = sign_manifest(m, key)
    mpath = tmp / "model.agm"
    mpath.write_bytes(signed.encode())
    pub_path = tmp / "publisher.pub"
    pub_path.write_bytes(pub_pem)
    return Published(root, mpath, signed, TrustPolicy(keys=frozenset({raw})), pub_path)


@pytest.fixture
def published(tmp_path: Path) -> Published:
    return publish(tmp_path)


@pytest.fixture
async def server(published: Published) -> AsyncIterator[FaultServer]:
    srv = FaultServer(published.root)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield srv
        nursery.cancel_scope.cancel()


@pytest.fixture
async def server2(published: Published) -> AsyncIterator[FaultServer]:
    srv = FaultServer(published.root, prefix="/m2/")
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield srv
        nursery.cancel_scope.cancel()
