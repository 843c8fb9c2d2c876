"""publish hf://ORG/REPO@REV: a signed manifest of a Hub commit, the Hub as web seed, the HF cache on fetch."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from safetensors.numpy import save

from autoglm.node._publish import plan_file

from .conftest import REPO, Hub, clean_env, run_cli, run_py, tree

pytestmark = pytest.mark.timeout(240)

FOLDER = f"models--{REPO.replace('/', '--')}"


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def one_copy(files: dict[str, bytes]) -> int:
    return sum(len(d) for d in set(files.values()))  # README.md and LICENSE are one blob


def origin_bytes(hub: Hub) -> int:
    return hub.server.stats.body_bytes + hub.cdn.stats.body_bytes


async def keygen(tmp: Path, env: dict[str, str]) -> Path:
    await run_cli(["--data-dir", str(tmp / "pub"), "keygen", "--out", str(tmp / "key")], env)
    return tmp / "key"


async def publish(tmp: Path, env: dict[str, str], cache: Path, out: Path, *extra: str, check: bool = True) -> Any:
    res = await run_cli(["--data-dir", str(tmp / "pub"), "publish", f"hf://{REPO}@main", "--key", str(tmp / "key"),
                         "--cache-dir", str(cache), "--out", str(out), "--max-piece", "64KiB", "--json", *extra], env, check=check)
    return res if not check else json.loads(res.stdout.decode().strip().splitlines()[-1])


async def test_publish_cold_then_warm_cache_verifies_and_matches_the_hub(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await keygen(tmp_path, env)
    cache = tmp_path / "cache"
    cold = await publish(tmp_path, env, cache, tmp_path / "cold.agm")
    fetched_cold = origin_bytes(hub)
    assert cold["from_cache"] is False and cold["commit"] == hub.commit and fetched_cold >= one_copy(hub.files)
    assert cold["name"] == f"hf:{REPO}" and cold["version"] == hub.commit
    assert cold["mirrors"] == [f"{hub.url}/{REPO}/resolve/{hub.commit}/"]

    # Warm: the snapshot is complete in the cache; no file byte is fetched again (only the API is asked).
    warm = await publish(tmp_path, env, cache, tmp_path / "warm.agm")
    assert warm["from_cache"] is True and warm["fetched_bytes"] == 0
    assert origin_bytes(hub) == fetched_cold, "file bytes fetched again from a warm cache"

    # Signed by the key; every file's SHA-256 is the Hub's, the pieces are the publisher's planning.
    res = await run_cli(["--data-dir", str(tmp_path / "v"), "verify-manifest", str(tmp_path / "warm.agm"),
                         "--trust", str(tmp_path / "key.pub"), "--json"], env)
    assert json.loads(res.stdout)["valid"] is True
    info = json.loads((await run_cli(["inspect", str(tmp_path / "warm.agm"), "--json"], env)).stdout)
    assert {f["path"]: f["sha256"] for f in info["files"]} == {p: hashlib.sha256(d).hexdigest() for p, d in hub.files.items()}
    snap = cache / FOLDER / "snapshots" / hub.commit
    for f in info["files"]:
        spans = [(p["offset"], p["length"]) for p in f["pieces"]]
        assert spans == plan_file(snap / f["path"], f["size"], 64 << 10), f["path"]
    shard = next(f for f in info["files"] if f["path"] == "model-00001-of-00002.safetensors")
    assert len(shard["pieces"]) > 1 and shard["pieces"][0]["length"] != 64 << 10  # tensor-aligned, not fixed
    # The cold publish read each file once: the shards' pieces and the small files' plans and hashes came from
    # the fetch's own read (README.md and LICENSE, one blob, shared it), and are exactly the pieces the warm
    # publish planned and hashed from the cache files.
    assert cold["read_again_bytes"] == 0
    assert warm["read_again_bytes"] == 0
    cold_info = json.loads((await run_cli(["inspect", str(tmp_path / "cold.agm"), "--json"], env)).stdout)
    assert [(f["path"], f["sha256"], f["pieces"]) for f in cold_info["files"]] == \
        [(f["path"], f["sha256"], f["pieces"]) for f in info["files"]]

    # The signed provenance beside it: repo, commit, endpoints, every file's Hub identity; no token.
    prov = json.loads((tmp_path / "warm.agm.hub.json").read_text())
    assert prov["repo"] == REPO and prov["commit"] == hub.commit and prov["endpoints"] == [hub.url]
    assert prov["manifest"] == info["id"]
    lfs = {f["path"]: f["sha256"] for f in prov["files"] if f["sha256"]}
    assert lfs and all(lfs[p] == hashlib.sha256(hub.files[p]).hexdigest() for p in lfs)


async def test_publish_refuses_when_the_cache_disagrees_with_the_hub(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await keygen(tmp_path, env)
    cache = tmp_path / "cache"
    await run_cli(["--data-dir", str(tmp_path / "f"), "fetch", f"hf://{REPO}", "--cache-dir", str(cache)], env)
    # The Hub now claims another SHA-256 for a shard the cache holds: the publisher must refuse.
    path = "model-00002-of-00002.safetensors"
    hub.server.repos[REPO].override[path] = "ab" * 32
    res = await publish(tmp_path, env, cache, tmp_path / "m.agm", check=False)
    assert res.returncode != 0
    assert b"refusing to publish" in res.stderr + res.stdout and path.encode() in res.stderr + res.stdout
    assert not (tmp_path / "m.agm").exists() and not (tmp_path / "m.agm.hub.json").exists()

    # A small file whose bytes in the cache changed: its git blob id no longer matches.
    hub.server.repos[REPO].override.clear()
    cfg = cache / FOLDER / "snapshots" / hub.commit / "config.json"
    blob = cfg.resolve()
    blob.write_bytes(b"{" + blob.read_bytes()[1:].replace(b"tiny", b"tinx"))
    res = await publish(tmp_path, env, cache, tmp_path / "m.agm", check=False)
    assert res.returncode != 0 and b"git blob id" in res.stderr + res.stdout


async def test_tampered_provenance_is_refused(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await keygen(tmp_path, env)
    await publish(tmp_path, env, tmp_path / "cache", tmp_path / "m.agm")
    side = tmp_path / "m.agm.hub.json"
    prov = json.loads(side.read_text())
    prov["mirrors"] = ["http://127.0.0.1:9/evil/"]
    side.write_text(json.dumps(prov))
    res = await run_cli(["--data-dir", str(tmp_path / "c"), "fetch", str(tmp_path / "m.agm"), "--standalone", "--hf-cache",
                         "--cache-dir", str(tmp_path / "c-cache"), "--trust", str(tmp_path / "key.pub")], env, check=False)
    assert res.returncode != 0 and b"provenance signature is invalid" in res.stderr + res.stdout
    assert not (tmp_path / "c-cache" / FOLDER / "snapshots").exists()

    # A valid provenance of another manifest (the same commit published again) is refused too.
    res = await run_cli(["--data-dir", str(tmp_path / "pub"), "publish", f"hf://{REPO}", "--key", str(tmp_path / "key"),
                         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "m2.agm")], env)
    text = res.stdout.decode()
    assert "read from the HF cache" in text and f"web seed   {hub.url}/{REPO}/resolve/{hub.commit}/" in text
    (tmp_path / "m.agm.hub.json").write_bytes((tmp_path / "m2.agm.hub.json").read_bytes())
    res = await run_cli(["--data-dir", str(tmp_path / "c"), "fetch", str(tmp_path / "m.agm"), "--standalone",
                         "--out", str(tmp_path / "c-out"), "--trust", str(tmp_path / "key.pub")], env, check=False)
    assert res.returncode != 0 and b"describes manifest" in res.stderr + res.stdout


async def test_fetch_manifest_into_the_hf_cache_is_found_offline(hub: Hub, tmp_path: Path) -> None:
    # What real repositories hold besides weights: a dotfile, an empty file.
    hub.files = {**hub.files, ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", "empty.txt": b""}
    hub.commit = hub.server.add_commit(REPO, hub.files)
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await keygen(tmp_path, env)
    await publish(tmp_path, env, tmp_path / "pubcache", tmp_path / "m.agm")
    served = origin_bytes(hub)
    # No --mirror typed: the Hub web seed comes from the signed provenance beside the manifest.
    ours = tmp_path / "ours"
    res = await run_cli(["--data-dir", str(tmp_path / "c"), "fetch", str(tmp_path / "m.agm"), "--standalone", "--hf-cache",
                         "--cache-dir", str(ours), "--trust", str(tmp_path / "key.pub"), "--json"], env)
    done = json.loads(res.stdout.decode().strip().splitlines()[-1])
    assert done["hf_snapshot"] == str(ours / FOLDER / "snapshots" / hub.commit)
    assert origin_bytes(hub) - served >= one_copy(hub.files)
    # Same layout as huggingface_hub's own download (the engine's files stay hidden, hard-linked as blobs).
    direct = tmp_path / "direct"
    await run_py(f"from huggingface_hub import snapshot_download; snapshot_download({REPO!r}, cache_dir={str(direct)!r})", env)
    ours_tree = {k: v for k, v in tree(ours / FOLDER).items() if not k.startswith(".autoglm-files")}
    assert ours_tree == tree(direct / FOLDER)
    blob = ours / FOLDER / "blobs" / hashlib.sha256(hub.files["model-00001-of-00002.safetensors"]).hexdigest()
    assert blob.stat().st_nlink == 2  # one copy on disk

    offline = clean_env(tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    code = f"""
import json
import os
from huggingface_hub import snapshot_download, try_to_load_from_cache
snap = snapshot_download({REPO!r}, cache_dir={str(ours)!r})
cfg = try_to_load_from_cache({REPO!r}, "config.json", cache_dir={str(ours)!r})
print(json.dumps([snap, cfg]))
"""
    snap, cfg = json.loads(await run_py(code, offline))
    assert Path(snap).name == hub.commit
    assert read(cfg) == hub.files["config.json"]


async def test_fetch_hf_cache_reuses_the_blobs_huggingface_hub_already_holds(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await keygen(tmp_path, env)
    await publish(tmp_path, env, tmp_path / "pubcache", tmp_path / "m.agm")
    # huggingface_hub itself downloaded the repository into this cache before.
    cache = tmp_path / "cache"
    await run_py(f"from huggingface_hub import snapshot_download; snapshot_download({REPO!r}, cache_dir={str(cache)!r})", env)
    shard = "model-00001-of-00002.safetensors"
    blob = cache / FOLDER / "blobs" / hashlib.sha256(hub.files[shard]).hexdigest()
    before_inode = blob.stat().st_ino
    # One blob there is not the signed bytes (same size): it must be fetched, never adopted.
    other = "model-00002-of-00002.safetensors"
    bad = cache / FOLDER / "blobs" / hashlib.sha256(hub.files[other]).hexdigest()
    bad.write_bytes(b"\0" * len(hub.files[other]))
    served = origin_bytes(hub)
    res = await run_cli(["--data-dir", str(tmp_path / "c"), "fetch", str(tmp_path / "m.agm"), "--standalone", "--hf-cache",
                         "--cache-dir", str(cache), "--trust", str(tmp_path / "key.pub"), "--json"], env)
    done = json.loads(res.stdout.decode().strip().splitlines()[-1])
    fetched = origin_bytes(hub) - served
    # Only the blob that did not match came over the network again (plus HTTP headers).
    assert len(hub.files[other]) <= fetched < len(hub.files[other]) + 64 * 1024, fetched
    assert blob.stat().st_ino == before_inode and blob.stat().st_nlink == 2  # reused in place: one copy on disk
    snap = Path(done["hf_snapshot"])
    assert {p: (snap / p).read_bytes() for p in hub.files} == hub.files


@pytest.mark.integration
async def test_two_nodes_seed_it_with_the_hub_as_only_web_seed(hub: Hub, tmp_path: Path) -> None:
    from tests.swarm.harness import processes, start_node

    big = {**hub.files}  # a new commit with a bigger shard
    big["big.safetensors"] = save({"w": np.random.default_rng(3).integers(0, 255, size=(6 << 20) // 4, dtype=np.int32)})
    commit = hub.server.add_commit(REPO, big)
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await keygen(tmp_path, env)
    info = await publish(tmp_path, env, tmp_path / "pubcache", tmp_path / "m.agm", "--max-piece", "1MiB")
    assert info["commit"] == commit
    size = info["size"]
    before = origin_bytes(hub)
    pub = {"manifest": tmp_path / "m.agm", "key": tmp_path / "key.pub"}

    def swarm() -> list[dict[str, Any]]:
        with processes() as procs:
            a = start_node(procs, tmp_path, "a", pub, env=env)  # no --mirror: the provenance names the Hub
            b = start_node(procs, tmp_path, "b", pub, bootstrap=[a.seen[0]["addrs"][0]], env=env)
            return [a.event("complete", 120), b.event("complete", 120)]

    results = await trio.to_thread.run_sync(swarm)
    origin = origin_bytes(hub) - before
    for r in results:
        assert r["bytes_total"] == size
    for name in ("a", "b"):
        out = tmp_path / f"{name}-out"
        assert {p: (out / p).read_bytes() for p in big} == big
    assert any(k.startswith("mirror") or "resolve" in k for r in results for k in r["bytes_by_source"])
    # Two nodes, one copy from the origin (the rest between peers): at most 1.25 copies.
    print(f"origin egress {origin / size:.2f} copies; by source {[r['bytes_by_source'] for r in results]}")
    assert size <= origin <= 1.25 * size


@pytest.mark.integration
async def test_name_publish_then_fetch_by_name_from_the_swarm(hub: Hub, tmp_path: Path) -> None:
    from tests.swarm.harness import CLI, processes, start_node

    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await keygen(tmp_path, env)
    pub = {"manifest": tmp_path / "m.agm", "key": tmp_path / "key.pub"}

    def swarm() -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
        import subprocess

        with processes() as procs:
            a = start_node(procs, tmp_path, "a", pub, seed=False, env=env)  # the publisher's node: DHT only
            boot = a.seen[0]["addrs"][0]
            # publish on a's data directory, and point the signed name record hf:ORG/REPO at the manifest.
            done = subprocess.run([*CLI, "--data-dir", str(tmp_path / "a"), "publish", f"hf://{REPO}", "--key", str(tmp_path / "key"),
                                   "--cache-dir", str(tmp_path / "pubcache"), "--out", str(pub["manifest"]), "--name-publish", "--json"],
                                  capture_output=True, timeout=120, env={**os.environ, **env})
            assert done.returncode == 0, done.stderr.decode()
            b = start_node(procs, tmp_path, "b", pub, bootstrap=[boot], env=env)
            b.event("complete", 120)
            c = start_node(procs, tmp_path, "c", pub, bootstrap=[boot], seed=False, env=env)
            del c
            got = subprocess.run([*CLI, "--data-dir", str(tmp_path / "c"), "fetch", f"hf:{REPO}", "--out", str(tmp_path / "c-out"),
                                  "--trust", str(pub["key"]), "--json"], capture_output=True, timeout=120, env={**os.environ, **env})
            return json.loads(done.stdout.decode().splitlines()[-1]), b.seen[-1], got.stdout, got.stderr

    published, _, out, err = await trio.to_thread.run_sync(swarm)
    assert published["name_record"]["event"] == "name-published" and published["name"] == f"hf:{REPO}"
    lines = [json.loads(ln) for ln in out.decode().splitlines()]
    assert lines and lines[-1]["event"] == "done", err.decode()[-3000:]
    assert set(lines[-1]["bytes_by_source"]) and all(k.startswith("peer:") for k in lines[-1]["bytes_by_source"])
    assert {p: read(str(tmp_path / "c-out" / p)) for p in hub.files} == hub.files


async def test_private_repo_two_endpoints_no_token_written_and_disagreement_refused(hub: Hub, tmp_path: Path) -> None:
    from .hubserver import HubServer

    hub.server.repos[REPO].token = "hf_sekret"
    second = HubServer(hub.root, cdn=hub.cdn)
    second.repos = {REPO: hub.server.repos[REPO]}
    async with trio.open_nursery() as nursery:
        await nursery.start(second.serve)
        env = clean_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN="hf_sekret")
        await keygen(tmp_path, env)
        mirror = f"http://127.0.0.1:{second.port}"
        info = await publish(tmp_path, env, tmp_path / "cache", tmp_path / "m.agm", "--endpoint", mirror)
        assert info["endpoints"] == [hub.url, mirror]
        assert info["mirrors"] == [f"{hub.url}/{REPO}/resolve/{hub.commit}/", f"{mirror}/{REPO}/resolve/{hub.commit}/"]
        for f in ("m.agm", "m.agm.hub.json"):
            assert b"hf_sekret" not in (tmp_path / f).read_bytes(), f

        # The second endpoint now names another SHA-256 for a shard: refused before anything is written.
        lying = HubServer(hub.root, cdn=hub.cdn)
        lying.repos = {REPO: type(hub.server.repos[REPO])(REPO, hub.server.repos[REPO].commits, hub.server.repos[REPO].refs,
                                                          "hf_sekret", {"model-00001-of-00002.safetensors": "cd" * 32})}
        await nursery.start(lying.serve)
        res = await publish(tmp_path, env, tmp_path / "cache", tmp_path / "m3.agm", "--endpoint", f"http://127.0.0.1:{lying.port}",
                            check=False)
        assert res.returncode != 0 and not (tmp_path / "m3.agm").exists()
        assert b"endpoints disagree on model-00001-of-00002.safetensors" in res.stderr
        nursery.cancel_scope.cancel()
