"""A new version takes its pieces from local places first (#14 §2): the old output directory, the HF cache, the store.

Every case runs a real fetch against a real HTTP mirror on 127.0.0.1 that
counts the body bytes it served: the mirror must serve exactly the pieces no
local place holds, and a local copy that does not match is refused and comes
from the mirror instead.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from autoglm.node._mirrors import MirrorConfig
from autoglm.node._sample import write_safetensors
from autoglm.node.api import FetchOptions, NodeConfig, open_node

from .conftest import Publisher, serving
from .faultserver import FaultServer

FAST = MirrorConfig(stall_timeout=2.0, backoff_base=0.01, backoff_cap=0.2, max_request_bytes=256 << 10)
HIDDEN = 256


def _tensors(layers: int, extra: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    t: dict[str, tuple[str, tuple[int, ...]]] = {}
    if extra:  # v2 inserts a tensor first: every other tensor's bytes move
        t["adapter.weight"] = ("F16", (96, HIDDEN))
    t["embed.weight"] = ("F16", (512, HIDDEN))
    for i in range(layers):
        t[f"layers.{i}.norm.weight"] = ("F32", (HIDDEN,))
        t[f"layers.{i}.mlp.up.weight"] = ("F16", (256, HIDDEN))
        t[f"layers.{i}.mlp.down.weight"] = ("F16", (HIDDEN, 256))
    return t


class Versions:
    """v1 and v2 of one model, signed by one key; v2 moves every tensor and changes one."""

    def __init__(self, tmp: Path) -> None:
        who = Publisher()
        self.trust = who.trust
        self.v1, self.v2 = tmp / "v1", tmp / "v2"
        for root, extra in ((self.v1, False), (self.v2, True)):
            root.mkdir()
            write_safetensors(root / "model.safetensors", _tensors(4, extra), b"s")
            (root / "config.json").write_text('{"model_type": "sample"}\n')
        # v2 also changes one tensor's bytes (a fine-tune of one layer): rewrite it with another seed.
        data = bytearray((self.v2 / "model.safetensors").read_bytes())
        v1_layer = (self.v1 / "model.safetensors").read_bytes()
        start = data.find(v1_layer[-4096:])  # the last tensor's tail, wherever v2 put it
        assert start > 0
        data[start : start + 4096] = hashlib.sha256(b"changed").digest() * 128
        (self.v2 / "model.safetensors").write_bytes(bytes(data))
        self.m1 = who.sign(self.v1, tmp / "v1.agm", version="1")
        self.m2 = who.sign(self.v2, tmp / "v2.agm", version="2")
        self.m2_path = tmp / "v2.agm"

    def changed_bytes(self) -> int:
        """Bytes of v2's pieces whose hash no v1 piece has: what must come from the network."""
        old = {p.hash for _, p in self.m1.manifest.iter_pieces()}
        return sum(p.length for _, p in self.m2.manifest.iter_pieces() if p.hash not in old)

    def assert_v2(self, out: Path) -> None:
        for f in self.m2.manifest.files:
            assert (out / f.path).read_bytes() == (self.v2 / f.path).read_bytes(), f.path


@pytest.fixture
def versions(tmp_path: Path) -> Versions:
    return Versions(tmp_path)


@pytest.fixture
async def mirror(versions: Versions) -> AsyncIterator[FaultServer]:
    async with serving(versions.v2) as srv:
        yield srv


async def _fetch(v: Versions, manifest: Path, data: Path, out: Path, mirror: FaultServer):  # type: ignore[no-untyped-def]
    async with open_node(NodeConfig(data, FAST)) as node:
        with trio.fail_after(60):
            return await node.fetch(manifest, out=out, trust=v.trust, mirrors=[mirror.url], options=FetchOptions(space_margin=0))


def test_the_edit_moves_every_tensor(versions: Versions) -> None:
    """The premise: v2's pieces are mostly v1's, at other offsets, and some are new."""
    changed = versions.changed_bytes()
    assert 0 < changed < versions.m2.manifest.total_size // 4
    off1 = {p.hash: p.offset for _, p in versions.m1.manifest.iter_pieces()}
    moved = [p for _, p in versions.m2.manifest.iter_pieces() if p.hash in off1 and off1[p.hash] != p.offset]
    assert len(moved) > 8


async def test_v2_over_v1_dir_with_empty_store_fetches_only_changed_bytes(versions: Versions, mirror: FaultServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(versions.v1, out)  # v1 in place, put there by anything: the store knows nothing of it
    res = await _fetch(versions, versions.m2_path, tmp_path / "data", out, mirror)
    versions.assert_v2(out)
    changed = versions.changed_bytes()
    assert mirror.stats.body_bytes == changed
    assert res.bytes_by_source["local:out"] == res.bytes_total - changed
    assert sum(n for sid, n in res.bytes_by_source.items() if sid.startswith("mirror:")) == changed


async def test_v2_from_the_hf_cache(versions: Versions, mirror: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf"
    repo = cache / "models--org--model"
    commit = "a" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in versions.m1.manifest.files:  # v1 as huggingface_hub lays it out: blobs by SHA-256, snapshot links
        blob = repo / "blobs" / f.sha256.hex()
        shutil.copyfile(versions.v1 / f.path, blob)
        (repo / "snapshots" / commit / f.path).symlink_to(Path("../..") / "blobs" / f.sha256.hex())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    res = await _fetch(versions, versions.m2_path, tmp_path / "data", tmp_path / "out", mirror)
    versions.assert_v2(tmp_path / "out")
    changed = versions.changed_bytes()
    config = next(f for f in versions.m2.manifest.files if f.path == "config.json")
    assert mirror.stats.body_bytes == changed
    assert res.bytes_by_source["local:hf"] == res.bytes_total - changed
    assert config.size > 0 and "local:hf" in res.bytes_by_source  # the unchanged config.json came from its blob


async def test_tampered_local_copy_is_refused_and_fetched_from_the_mirror(versions: Versions, mirror: FaultServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serving(versions.v1) as v1_mirror:
        await _fetch(versions, tmp_path / "v1.agm", data, tmp_path / "out1", v1_mirror)
    # The store records v1 in out1. Someone changes one byte of a piece v2 shares:
    # the store still points at it, so only reading it again can tell.
    shared = {p.hash for _, p in versions.m2.manifest.iter_pieces()}
    victim = next(p for _, p in versions.m1.manifest.iter_pieces() if p.hash in shared and p.offset > 0)
    path = tmp_path / "out1" / "model.safetensors"
    body = bytearray(path.read_bytes())
    body[victim.offset + 10] ^= 0xFF
    path.write_bytes(bytes(body))
    res = await _fetch(versions, versions.m2_path, data, tmp_path / "out2", mirror)
    versions.assert_v2(tmp_path / "out2")
    changed = versions.changed_bytes()
    assert mirror.stats.body_bytes == changed + victim.length
    assert res.bytes_by_source["local:store"] == res.bytes_total - changed - victim.length
