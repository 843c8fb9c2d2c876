"""fetch hf:// against the real huggingface_hub: the same cache tree, found offline, weights load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from .conftest import REPO, Hub, clean_env, model_files, run_cli, run_py, tensors, tree

SNAPSHOT = """
import json, sys
from huggingface_hub import snapshot_download
print(json.dumps(snapshot_download({repo!r}, cache_dir={cache!r}{extra})))
"""


async def test_fetch_matches_snapshot_download_and_is_found_offline(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    direct, ours = tmp_path / "direct", tmp_path / "ours"
    # The server's fidelity: the real client downloads from it directly.
    path = json.loads(await run_py(SNAPSHOT.format(repo=REPO, cache=str(direct), extra=""), env))
    assert Path(path).name == hub.commit
    served_direct = hub.cdn.stats.body_bytes
    assert served_direct > 0  # LFS bytes came from the CDN host

    res = await run_cli(["--data-dir", str(tmp_path / "data"), "fetch", f"hf://{REPO}", "--cache-dir", str(ours), "--json"], env)
    lines = [json.loads(ln) for ln in res.stdout.decode().splitlines()]
    assert lines[0]["event"] == "hub" and lines[0]["trust"] == "hub-attested" and lines[0]["commit"] == hub.commit
    # Progress names repository paths (the blobs are content-addressed); README.md and LICENSE share a blob.
    done_files = {ln["path"] for ln in lines if ln["event"] == "file"}
    assert done_files >= set(hub.files) - {"LICENSE", "README.md"} and done_files & {"LICENSE", "README.md"}
    assert lines[-1]["event"] == "done" and lines[-1]["path"] == str(ours / f"models--{REPO.replace('/', '--')}" / "snapshots" / hub.commit)
    folder = f"models--{REPO.replace('/', '--')}"
    assert tree(ours / folder) == tree(direct / folder)
    assert not list((ours / folder).rglob("*.autoglm*")), "staging left behind"

    # Offline: what fetch wrote is found by huggingface_hub without a network.
    offline = clean_env(tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    code = f"""
import json
from huggingface_hub import snapshot_download, try_to_load_from_cache, hf_hub_download
snap = snapshot_download({REPO!r}, cache_dir={str(ours)!r})
cfg = try_to_load_from_cache({REPO!r}, "config.json", cache_dir={str(ours)!r})
shard = hf_hub_download({REPO!r}, "model-00002-of-00002.safetensors", cache_dir={str(ours)!r})
print(json.dumps([snap, cfg, shard]))
"""
    snap, cfg, shard = json.loads(await run_py(code, offline))
    assert Path(snap).name == hub.commit
    _check_weights(cfg, shard, hub.files["config.json"])


def _check_weights(cfg: str, shard: str, config: bytes) -> None:
    assert Path(cfg).read_bytes() == config
    got = load_file(shard)
    for k, v in tensors(101).items():
        np.testing.assert_array_equal(got[f"b.{k}"], v)


async def test_local_dir_is_what_hf_download_recognises(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    out = tmp_path / "local"
    await run_cli(["--data-dir", str(tmp_path / "data"), "fetch", f"hf://{REPO}", "--local-dir", str(out)], env)
    for p, data in hub.files.items():
        assert (out / p).read_bytes() == data, p
        assert not (out / p).is_symlink()
    before = hub.cdn.stats.body_bytes + hub.server.stats.body_bytes
    # huggingface_hub finds the files up to date by their metadata: nothing is downloaded again.
    code = f"""
from huggingface_hub import snapshot_download
print(snapshot_download({REPO!r}, local_dir={str(out)!r}))
"""
    await run_py(code, env)
    assert hub.cdn.stats.body_bytes + hub.server.stats.body_bytes == before
    assert not (out / ".autoglm-partial").exists()


async def test_include_exclude_and_revisions(hub: Hub, tmp_path: Path) -> None:
    first = hub.commit
    hub.server.repos[REPO].refs["v1"] = first
    second = hub.server.add_commit(REPO, model_files(seed=2), refs=("main",))
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    cache = tmp_path / "cache"
    base = ["--data-dir", str(tmp_path / "data"), "fetch", "--cache-dir", str(cache)]
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"

    await run_cli([*base, f"hf://{REPO}@v1", "--include", "*.json", "--exclude", "tokenizer*"], env)
    assert (repo_dir / "refs" / "v1").read_text() == first
    snap = repo_dir / "snapshots" / first
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if not p.is_dir()) == ["config.json", "model.safetensors.index.json"]

    await run_cli([*base, f"hf://{REPO}"], env)
    assert (repo_dir / "refs" / "main").read_text() == second
    assert json.loads((repo_dir / "snapshots" / second / "config.json").read_text())["seed"] == 2

    await run_cli([*base, f"hf://{REPO}", "--revision", first, "--include", "sub/"], env)
    assert (repo_dir / "snapshots" / first / "sub" / "dir" / "notes.txt").read_bytes() == hub.files["sub/dir/notes.txt"]
    assert sorted(p.name for p in (repo_dir / "refs").iterdir()) == ["main", "v1"]  # no ref for a commit

    res = await run_cli([*base, f"hf://{REPO}@nope"], env, check=False)
    assert res.returncode != 0 and b"RevisionNotFound" in res.stderr


async def test_blobs_already_in_the_cache_are_checked_and_kept(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    cache = tmp_path / "cache"
    await run_py(SNAPSHOT.format(repo=REPO, cache=str(cache), extra=", allow_patterns=['*.safetensors']"), env)
    shard_bytes = hub.cdn.stats.body_bytes
    # One blob rotted on disk since: it is fetched again, the others are kept.
    folder = cache / f"models--{REPO.replace('/', '--')}"
    _rot(folder, hub.files["model-00001-of-00002.safetensors"])
    await run_cli(["--data-dir", str(tmp_path / "data"), "fetch", f"hf://{REPO}", "--cache-dir", str(cache)], env)
    assert hub.cdn.stats.body_bytes - shard_bytes == len(hub.files["model-00001-of-00002.safetensors"])
    _check_snapshot(folder / "snapshots" / hub.commit, hub.files)


def _rot(folder: Path, data: bytes) -> None:
    import hashlib

    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    raw = bytearray(blob.read_bytes())
    raw[100] ^= 1
    blob.write_bytes(bytes(raw))


def _check_snapshot(snap: Path, files: dict[str, bytes]) -> None:
    for p, data in files.items():
        assert (snap / p).read_bytes() == data, p
