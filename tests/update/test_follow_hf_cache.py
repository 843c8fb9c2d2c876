"""`join --follow hf:ORG/REPO --hf-cache`: a fleet follows a model published from the Hub, in the HF cache layout.

A real Hub-shaped server (tests/hub/hubserver.py), real nodes on 127.0.0.1.
The publisher P publishes `hf://acme/tiny-model@main` (v1), holds it and
points the name at it; the follower F joins with `--follow hf:acme/tiny-model
--hf-cache` and so gets no .hub.json: the Hub identity comes from the signed
manifest (name hf:ORG/REPO, version the commit). A new commit (v2, one shard
changed) is published by name; F switches `current` and then refs/main, and
huggingface_hub offline (snapshot_download, try_to_load_from_cache) loads v2,
with the cache's blobs named as the Hub names them (the same tree listing and
snapshot links as the publisher's own cache, filled from the Hub) and hard
links to F's version files. `rollback` gives v1 back to huggingface_hub;
`update NAME --hf-cache` through the running node moves it to v2 again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
from safetensors.numpy import save

from autoglm.node._versions import resolve_current
from tests.hub.conftest import REPO, Hub, clean_env, run_cli, tensors
from tests.hub.conftest import hub as hub  # the fixture
from tests.swarm.harness import CLI, Proc, processes
from tests.update._models import offline_load

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NAME = f"hf:{REPO}"
FOLDER = f"models--{REPO.replace('/', '--')}"
SHARD = "model-00002-of-00002.safetensors"
INTERVAL = 3.0
BOUND = INTERVAL + 20 + 60  # the follow bound (docs/operations.md) with slack for a loaded 2-core machine


async def _start(procs: list[Proc], tmp: Path, name: str, env: dict[str, str], *extra: str) -> Proc:
    p = Proc([*CLI, "-v", "--data-dir", str(tmp / name), "join", "--json", "--trust", str(tmp / "key.pub"), *extra],
             name, tmp, env)
    procs.append(p)
    await trio.to_thread.run_sync(p.event, "ready", 90)
    return p


async def _release(tmp: Path, env: dict[str, str], n: int) -> Path:
    """Publish the hub's main as v<n>, P fetches it (the Hub as web seed) and points the name at it (seq n)."""
    out = tmp / f"v{n}.agm"
    pub = ["--data-dir", str(tmp / "pub")]
    await run_cli([*pub, "publish", f"hf://{REPO}@main", "--key", str(tmp / "key"), "--cache-dir", str(tmp / "pubcache"),
                   "--out", str(out), "--max-piece", "64KiB", "--json"], env)
    node = ["--data-dir", str(tmp / "P")]
    await run_cli([*node, "fetch", str(out), "--trust", str(tmp / "key.pub"), "--out", str(tmp / f"P-v{n}")], env)
    await run_cli([*node, "name-publish", str(out), "--key", str(tmp / "key"), "--seq", str(n), "--json"], env)
    return out


async def _wait_ref(cache: Path, commit: str, proc: Proc) -> None:
    ref = cache / FOLDER / "refs" / "main"
    with trio.move_on_after(BOUND) as scope:
        while not (ref.is_file() and ref.read_text() == commit):
            assert proc.p.poll() is None, f"{proc.name} exited:\n{proc.stderr_tail()}"
            await trio.sleep(0.3)
    assert not scope.cancelled_caught, f"refs/main is not {commit} after {BOUND}s:\n{proc.stderr_tail()}"


async def _offline_load(tmp: Path, cache: Path) -> tuple[str, bytes]:
    """What huggingface_hub, offline, loads from ``cache``: (the snapshot's commit, the second shard's bytes)."""
    return await offline_load(tmp, cache, SHARD)


def _links(snap: Path) -> dict[str, str]:
    return {str(p.relative_to(snap)): os.readlink(p) for p in sorted(snap.rglob("*")) if p.is_symlink()}


async def test_a_follower_with_hf_cache_moves_refs_with_each_version_and_rolls_back(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await run_cli(["--data-dir", str(tmp_path / "pub"), "keygen", "--out", str(tmp_path / "key")], env)
    cache = tmp_path / "fcache"
    c1, shard1 = hub.commit, hub.files[SHARD]
    with processes() as procs:
        p = await _start(procs, tmp_path, "P", env)
        boot = p.seen[0]["addrs"][0]
        await _release(tmp_path, env, 1)
        f = await _start(procs, tmp_path, "F", env, "--bootstrap", boot, "--follow", NAME, "--follow-interval",
                         str(INTERVAL), "--hf-cache", "--cache-dir", str(cache))
        await _wait_ref(cache, c1, f)
        assert await _offline_load(tmp_path, cache) == (c1, shard1)

        # v2: a new commit that rewrites one shard, published by name
        files2 = {**hub.files, SHARD: save({f"b.{k}": v for k, v in tensors(202).items()})}
        c2 = hub.server.add_commit(REPO, files2)
        await _release(tmp_path, env, 2)
        await _wait_ref(cache, c2, f)
        root = tmp_path / "F" / "models" / "hf_acme_tiny-model"
        cur = resolve_current(root)
        assert cur is not None and (cur / SHARD).read_bytes() == files2[SHARD]
        assert await _offline_load(tmp_path, cache) == (c2, files2[SHARD])
        # one copy of the bytes: the blob is the version's file
        assert (cache / FOLDER / "snapshots" / c2 / SHARD).resolve().stat().st_ino == (cur / SHARD).stat().st_ino
        # blobs named as the Hub names them: the same links and tree listing as the publisher's cache (from the Hub)
        mine, theirs = cache / FOLDER, tmp_path / "pubcache" / FOLDER
        assert _links(mine / "snapshots" / c2) == _links(theirs / "snapshots" / c2)
        assert json.loads((mine / "trees" / f"{c2}.json").read_text()) == json.loads((theirs / "trees" / f"{c2}.json").read_text())
        assert not list((mine / "refs").glob(".*"))

        # rollback on the follower: current and refs/main back to v1, nothing fetched
        node = ["--data-dir", str(tmp_path / "F")]
        back = json.loads((await run_cli([*node, "rollback", NAME, "--json"], env)).stdout)
        assert back["hf_commit"] == c1 and (cache / FOLDER / "refs" / "main").read_text() == c1
        assert await _offline_load(tmp_path, cache) == (c1, shard1)

        # `update NAME --hf-cache` through the running node: v2 again (already on disk), refs/main with it
        res = await run_cli([*node, "update", NAME, "--hf-cache", "--cache-dir", str(cache), "--json"], env)
        up = json.loads(res.stdout.decode().strip().splitlines()[-1])
        assert up["switched"] is True and up["hf_snapshot"] == str(cache / FOLDER / "snapshots" / c2)
        assert await _offline_load(tmp_path, cache) == (c2, files2[SHARD])
        assert f.p.poll() is None, f.stderr_tail()


def test_follow_hf_cache_of_a_name_not_from_the_hub_is_refused_at_start(tmp_path: Path) -> None:
    import subprocess

    for extra in (["--follow", "t/model", "--hf-cache"], ["--hf-cache"], ["--follow", NAME, "--hf-revision", "dev"]):
        p = subprocess.run([*CLI, "--data-dir", str(tmp_path / "n"), "join", "--json", *extra],
                           capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 2 and "--hf-cache" in p.stderr, (extra, p.stderr[-2000:])
