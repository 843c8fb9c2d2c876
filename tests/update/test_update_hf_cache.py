"""`update M.agm --hf-cache`: a model published from hf:// moves to a new Hub commit in the HF cache layout.

A real Hub-shaped server (tests/hub/hubserver.py); v2 is a new commit that
changes one shard. `update --hf-cache` fetches only that shard's changed
pieces, switches `current`, then writes the cache: the blobs are hard links
to the new version's files and refs/main names the new commit (replaced in
one rename). huggingface_hub, offline, then loads the new commit.
`rollback` moves refs/main back with `current` (huggingface_hub loads the old
commit), `gc` keeps the kept versions' snapshots, and a rollback to a version
whose snapshot was deleted from the cache fails before changing anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import save

from autoglm.node._versions import resolve_current
from tests.hub.conftest import REPO, Hub, clean_env, run_cli, tensors
from tests.hub.conftest import hub as hub  # the fixture

from ._models import cli, keygen, offline_load, publish, write_version

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FOLDER = f"models--{REPO.replace('/', '--')}"
SHARD = "model-00002-of-00002.safetensors"


def origin_bytes(h: Hub) -> int:
    return h.server.stats.body_bytes + h.cdn.stats.body_bytes


async def _publish(tmp: Path, env: dict[str, str], out: Path) -> None:
    await run_cli(["--data-dir", str(tmp / "pub"), "publish", f"hf://{REPO}@main", "--key", str(tmp / "key"),
                   "--cache-dir", str(tmp / "pubcache"), "--out", str(out), "--max-piece", "64KiB", "--json"], env)


async def _update(tmp: Path, env: dict[str, str], manifest: Path, cache: Path) -> dict[str, object]:
    res = await run_cli(["--data-dir", str(tmp / "node"), "update", str(manifest), "--standalone", "--hf-cache",
                         "--cache-dir", str(cache), "--trust", str(tmp / "key.pub"), "--json"], env)
    return json.loads(res.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


async def test_update_moves_the_hf_cache_ref_to_the_new_commit_fetching_only_the_delta(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await run_cli(["--data-dir", str(tmp_path / "pub"), "keygen", "--out", str(tmp_path / "key")], env)
    c1 = hub.commit
    files1 = dict(hub.files)
    await _publish(tmp_path, env, tmp_path / "v1.agm")
    cache = tmp_path / "ours"
    up1 = await _update(tmp_path, env, tmp_path / "v1.agm", cache)
    assert up1["hf_snapshot"] == str(cache / FOLDER / "snapshots" / c1)
    assert (cache / FOLDER / "refs" / "main").read_text() == c1

    # v2: a new commit that rewrites one shard
    files2 = {**hub.files, SHARD: save({f"b.{k}": v for k, v in tensors(202).items()})}
    c2 = hub.server.add_commit(REPO, files2)
    await _publish(tmp_path, env, tmp_path / "v2.agm")
    before = origin_bytes(hub)
    up2 = await _update(tmp_path, env, tmp_path / "v2.agm", cache)
    fetched = origin_bytes(hub) - before
    assert up2["switched"] is True and up2["previous"] == up1["current"]
    assert 0 < fetched <= len(files2[SHARD]) + 64 * 1024, fetched  # the changed shard (at most), nothing else
    assert (cache / FOLDER / "refs" / "main").read_text() == c2
    assert up2["hf_snapshot"] == str(cache / FOLDER / "snapshots" / c2)
    cur = resolve_current(Path(str(up2["root"])))
    assert cur is not None and cur.name == up2["current"]
    # one copy on disk: the blob is the version's file
    blob = cache / FOLDER / "snapshots" / c2 / SHARD
    assert blob.resolve().stat().st_ino == (cur / SHARD).stat().st_ino

    assert await _offline_load(tmp_path, cache) == (c2, files2[SHARD])

    # rollback: current and refs/main go back to v1; huggingface_hub, offline, loads c1
    node = ["--data-dir", str(tmp_path / "node")]
    vdir = ["--versions-dir", str(up2["root"])]
    back = json.loads((await run_cli([*node, "rollback", REPO, *vdir, "--json"], env)).stdout)
    assert back["current"] == up1["current"] and back["hf_commit"] == c1
    listed = [json.loads(x) for x in (await run_cli([*node, "versions", REPO, *vdir, "--json"], env)).stdout.splitlines()]
    assert [(x["version"], x["hf_commit"]) for x in listed] == [(up1["current"], c1), (up2["current"], c2)]
    assert (cache / FOLDER / "refs" / "main").read_text() == c1
    assert not list((cache / FOLDER / "refs").glob(".*"))  # no temp file left beside the ref
    assert await _offline_load(tmp_path, cache) == (c1, files1[SHARD])
    # gc keeps the kept versions and their snapshots
    await run_cli([*node, "gc", "--json"], env)
    assert await _offline_load(tmp_path, cache) == (c1, files1[SHARD])
    fwd = json.loads((await run_cli([*node, "rollback", REPO, *vdir, "--json"], env)).stdout)
    assert fwd["current"] == up2["current"] and (cache / FOLDER / "refs" / "main").read_text() == c2

    # v1's snapshot deleted from the cache (as `hf cache delete` does): the rollback fails, nothing changes
    shutil.rmtree(cache / FOLDER / "snapshots" / c1)
    res = await run_cli([*node, "rollback", REPO, *vdir], env, check=False)
    assert res.returncode != 0 and b"snapshot" in res.stderr and c1[:12].encode() in res.stderr, res.stderr
    assert (cache / FOLDER / "refs" / "main").read_text() == c2
    cur = resolve_current(Path(str(up2["root"])))
    assert cur is not None and cur.name == up2["current"]
    assert await _offline_load(tmp_path, cache) == (c2, files2[SHARD])


async def _offline_load(tmp: Path, cache: Path) -> tuple[str, bytes]:
    """What huggingface_hub, offline, loads from ``cache``: (the snapshot's commit, the second shard's bytes)."""
    return await offline_load(tmp, cache, SHARD)


def test_update_hf_cache_refuses_a_model_not_published_from_the_hub_before_fetching(tmp_path: Path) -> None:
    """No .hub.json and a manifest named otherwise than hf:ORG/REPO: no Hub identity, so nothing is fetched."""
    key, pub = keygen(tmp_path)
    m = publish(tmp_path, write_version(tmp_path, 1), key, 1)
    res = cli("--data-dir", str(tmp_path / "node"), "update", str(m), "--standalone", "--hf-cache", "--cache-dir",
              str(tmp_path / "cache"), "--trust", str(pub), "--mirror", "http://127.0.0.1:9/", ok=False)
    assert res.returncode != 0 and "hf:ORG/REPO" in res.stderr and ".hub.json" in res.stderr, res.stderr
    assert not (tmp_path / "cache").exists()
    assert not list((tmp_path / "node" / "models").rglob("*.safetensors"))
    bad = cli("--data-dir", str(tmp_path / "node"), "update", str(m), "--standalone", "--hf-cache", "--hf-revision",
              "../x", "--trust", str(pub), "--mirror", "http://127.0.0.1:9/", ok=False)
    assert bad.returncode != 0 and "not a branch or tag name" in bad.stderr, bad.stderr
