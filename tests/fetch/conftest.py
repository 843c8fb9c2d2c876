"""Fixtures for fetch tests: a published, signed sample model and a fault-injecting mirror."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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


class Publisher:
    """A fresh publisher key: it signs manifests of a folder, and ``trust`` trusts it."""

    def __init__(self) -> None:
        self.key = generate_private_key()
        self.pem = encode_public_key(self.key)
        self.raw = parse_public_key(self.pem)
        self.trust = TrustPolicy(keys=frozenset({self.raw}))

    def sign(self, root: Path, path: Path, version: str = "1", piece: int = PIECE) -> SignedManifest:
        """The signed manifest of ``root`` (the model test/model), written to ``path``."""
        m = build_manifest(root, name="test/model", version=version, publisher=key_id(self.raw),
                           created_at=int(time.time()), max_piece=piece)
        signed = sign_manifest(m, self.key)
        path.write_bytes(signed.encode())
        return signed


def publish(tmp: Path, size: int = 1 << 20, piece: int = PIECE, seed: bytes = b"t") -> Published:
    root = tmp / "published"
    write_sample_model(root, size=size, seed=seed)
    who = Publisher()
    mpath = tmp / "model.agm"
    signed = who.sign(root, mpath, piece=piece)
    pub_path = tmp / "publisher.pub"
    pub_path.write_bytes(who.pem)
    return Published(root, mpath, signed, who.trust, pub_path)


@asynccontextmanager
async def serving(root: Path, prefix: str = "/") -> AsyncIterator[FaultServer]:
    """A FaultServer of ``root`` on 127.0.0.1 for the length of the block."""
    srv = FaultServer(root, prefix=prefix)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield srv
        nursery.cancel_scope.cancel()


@pytest.fixture
def published(tmp_path: Path) -> Published:
    return publish(tmp_path)


@pytest.fixture
async def server(published: Published) -> AsyncIterator[FaultServer]:
    async with serving(published.root) as srv:
        yield srv


@pytest.fixture
async def server2(published: Published) -> AsyncIterator[FaultServer]:
    async with serving(published.root, prefix="/m2/") as srv:
        yield srv
