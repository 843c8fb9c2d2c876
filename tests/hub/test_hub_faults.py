"""fetch hf:// under faults: tokens and redirects, 429/502/504/resets, HTML, lying endpoints, kill and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from autoglm.node._engine import FetchOptions
from autoglm.node._mirrors import MirrorConfig
from autoglm.node._store import Store
from autoglm.node.errors import IntegrityError, SourceError
from autoglm.node.hub import HubFetchPlan, fetch_hub, parse_ref, resolve_snapshot
from tests.fetch.faultserver import FaultServer

from .conftest import REPO, Hub, clean_env, model_files, run_cli
from .hubserver import HubServer

FAST = MirrorConfig(backoff_base=0.01, backoff_cap=0.2, retry_after_cap=1.0, stall_timeout=5.0)
FOLDER = f"models--{REPO.replace('/', '--')}"


def _plan(hub: Hub, tmp: Path, *endpoints: str, **kw: object) -> HubFetchPlan:
    return HubFetchPlan(parse_ref(f"hf://{REPO}"), endpoints or (hub.url,), cache_dir=tmp / "cache", **kw)  # type: ignore[arg-type]


async def _fetch(plan: HubFetchPlan, tmp: Path, config: MirrorConfig = FAST) -> Path:
    store = Store(tmp / "data")
    try:
        res = await fetch_hub(store, plan, mirror_config=config, options=FetchOptions(check_space=False))
    finally:
        store.close()
    return res.path


def _same(snap: Path, files: dict[str, bytes]) -> None:
    for p, data in files.items():
        assert (snap / p).read_bytes() == data, p


async def test_private_repo_needs_token_and_cdn_never_sees_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cdn = FaultServer(root)
    srv = HubServer(root, cdn=cdn)
    files = model_files(seed=5)
    srv.add_commit("acme/secret", files, token="hf_sekret")
    (tmp_path / "tok").write_text("hf_sekret\n")
    async with trio.open_nursery() as nursery:
        await nursery.start(cdn.serve)
        await nursery.start(srv.serve)
        env = clean_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{srv.port}")
        base = ["--data-dir", str(tmp_path / "data"), "fetch", "hf://acme/secret", "--cache-dir", str(tmp_path / "c")]
        res = await run_cli(base, env, check=False)
        assert res.returncode != 0 and b"401" in res.stderr and b"token" in res.stderr
        await run_cli([*base, "--token-file", str(tmp_path / "tok")], env)
        # HF_TOKEN works too, and a token never shows in the output.
        res = await run_cli([*base, "--json"], {**env, "HF_TOKEN": "hf_sekret"})
        assert b"hf_sekret" not in res.stdout + res.stderr
        nursery.cancel_scope.cancel()
    _same(tmp_path / "c" / "models--acme--secret" / "snapshots" / srv.repos["acme/secret"].refs["main"], files)
    assert any(h.get("authorization") == "Bearer hf_sekret" for h in srv.stats.headers)
    assert cdn.stats.requests > 0
    assert not any("authorization" in h for h in cdn.stats.headers), "the token went to another host"


async def test_relative_redirect_on_same_host_keeps_working(tmp_path: Path) -> None:
    root = tmp_path / "root"
    srv = HubServer(root, relative_cdn=True)
    files = model_files(seed=6)
    commit = srv.add_commit(REPO, files)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        url = f"http://127.0.0.1:{srv.port}"
        snap = await _fetch(HubFetchPlan(parse_ref(f"hf://{REPO}"), (url,), cache_dir=tmp_path / "cache"), tmp_path)
        nursery.cancel_scope.cancel()
    assert snap.name == commit
    _same(snap, files)
    assert any(p.startswith("objects/") and st == 206 for p, st, _ in srv.stats.log)


@pytest.mark.parametrize("kind", ["429", "502", "504", "reset", "drop"])
async def test_transient_faults_complete(hub: Hub, tmp_path: Path, kind: str) -> None:
    # The first requests fail, API calls included; Retry-After is honoured.
    for srv in (hub.server, hub.cdn):
        srv.add(kind, count=3, retry_after=1, after=100)
    snap = await _fetch(_plan(hub, tmp_path), tmp_path)
    _same(snap, hub.files)


async def test_html_endpoint_is_left_out_and_alone_refused(hub: Hub, tmp_path: Path) -> None:
    portal = FaultServer(tmp_path / "empty")
    portal.add("html", count=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(portal.serve)
        purl = f"http://127.0.0.1:{portal.port}"
        snap = await resolve_snapshot(parse_ref(f"hf://{REPO}"), (purl, hub.url), None)
        assert snap.endpoints == (hub.url,) and "HTML" in snap.dropped[0]
        with pytest.raises(SourceError, match="HTML"):
            await resolve_snapshot(parse_ref(f"hf://{REPO}"), (purl,), None)
        nursery.cancel_scope.cancel()


async def test_endpoints_disagreeing_on_a_hash_are_refused(hub: Hub, tmp_path: Path) -> None:
    liar = HubServer(tmp_path / "liar-root")
    liar.add_commit(REPO, hub.files)
    liar.repos[REPO].commits = hub.server.repos[REPO].commits  # the same commit id...
    liar.repos[REPO].refs = dict(hub.server.repos[REPO].refs)
    liar.repos[REPO].override["model-00001-of-00002.safetensors"] = "ab" * 32  # ...but another SHA-256
    async with trio.open_nursery() as nursery:
        await nursery.start(liar.serve)
        with pytest.raises(IntegrityError, match="disagree on model-00001"):
            await _fetch(_plan(hub, tmp_path, hub.url, f"http://127.0.0.1:{liar.port}"), tmp_path)
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "cache" / FOLDER / "blobs").exists()


async def test_wrong_bytes_fail_the_whole_file_check_then_a_rerun_completes(hub: Hub, tmp_path: Path) -> None:
    shard = "model-00002-of-00002.safetensors"
    hub.cdn.add("wrong", count=1)  # one LFS body with a flipped byte: no piece hash can catch it
    with pytest.raises(IntegrityError, match=r"do not match the hub's SHA-256.*came from mirror:http://127\.0\.0\.1"):
        await _fetch(_plan(hub, tmp_path), tmp_path)
    blobs = tmp_path / "cache" / FOLDER / "blobs"
    snaps = tmp_path / "cache" / FOLDER / "snapshots"
    assert not snaps.exists(), "a snapshot was linked after a failed fetch"
    assert all(len(p.name) in (40, 64) for p in blobs.iterdir() if p.is_file())
    snap = await _fetch(_plan(hub, tmp_path), tmp_path)
    _same(snap, hub.files)
    assert (snap / shard).resolve().parent == blobs.resolve()


async def test_two_endpoints_share_the_work(hub: Hub, tmp_path: Path) -> None:
    second = HubServer(hub.root, cdn=hub.cdn)
    second.repos = hub.server.repos
    async with trio.open_nursery() as nursery:
        await nursery.start(second.serve)
        second.add("502", count=1000, path="model-00001-of-00002.safetensors")  # this one cannot serve a shard
        snap = await _fetch(_plan(hub, tmp_path, hub.url, f"http://127.0.0.1:{second.port}"), tmp_path)
        nursery.cancel_scope.cancel()
    _same(snap, hub.files)


async def _run_until(args: list[str], env: dict[str, str], kill_after_pieces: int | None) -> None:
    proc = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    seen = 0
    buf = b""
    try:
        assert proc.stdout is not None
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            seen += sum(1 for ln in lines if json.loads(ln).get("event") == "piece")
            if kill_after_pieces is not None and seen >= kill_after_pieces:
                proc.send_signal(signal.SIGKILL)
                break
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == (0 if kill_after_pieces is None else -signal.SIGKILL)


async def test_sigkill_then_resume_refetches_at_most_a_piece_per_connection(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cdn = FaultServer(root)
    srv = HubServer(root, cdn=cdn)
    files = model_files(seed=9, big=4 << 20)
    commit = srv.add_commit(REPO, files)
    big_sha = srv.repos[REPO].commits[commit]["big.safetensors"].sha256
    piece, conns = 64 << 10, 4
    cdn.add("trickle", count=1_000_000, chunk=8 << 10, interval=0.005, path=f"objects/{big_sha}")
    async with trio.open_nursery() as nursery:
        await nursery.start(cdn.serve)
        await nursery.start(srv.serve)
        env = clean_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{srv.port}")
        args = [sys.executable, "-m", "autoglm.node.cli", "--data-dir", str(tmp_path / "data"), "fetch", f"hf://{REPO}",
                "--cache-dir", str(tmp_path / "c"), "--json", "--piece-size", str(piece),
                "--connections", str(conns), "--max-connections", str(conns)]
        kills = [5, 20]
        with trio.fail_after(120):
            for k in kills:
                await _run_until(args, env, k)
                assert not (tmp_path / "c" / FOLDER / "snapshots").exists()
            cdn.faults.clear()
            await _run_until(args, env, None)
        nursery.cancel_scope.cancel()
    _same(tmp_path / "c" / FOLDER / "snapshots" / commit, files)
    size = len(files["big.safetensors"])
    served = cdn.stats.by_path[f"objects/{big_sha}"]
    assert served <= size + len(kills) * conns * piece, (served, size)



async def test_modelscope_reference(tmp_path: Path) -> None:
    """ms://: ModelScope's file list (Sha256 per file) and its /repo?FilePath= bytes, checked by SHA-256."""
    srv = HubServer(tmp_path / "root")
    files = model_files(seed=11)
    commit = srv.add_commit(REPO, files, refs=("master",))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        env = clean_env(tmp_path, MODELSCOPE_DOMAIN=f"http://127.0.0.1:{srv.port}")
        res = await run_cli(["--data-dir", str(tmp_path / "data"), "fetch", f"ms://{REPO}", "--local-dir", str(tmp_path / "out"), "--json"], env)
        assert json.loads(res.stdout.decode().splitlines()[0])["commit"] == commit
        srv.repos[REPO].override["config.json"] = "cd" * 32  # a listing that lies about one file
        bad = await run_cli(["--data-dir", str(tmp_path / "data2"), "fetch", f"ms://{REPO}", "--local-dir", str(tmp_path / "out2")], env, check=False)
        nursery.cancel_scope.cancel()
    _same(tmp_path / "out", files)
    assert bad.returncode != 0 and b"config.json" in bad.stderr and b"SHA-256" in bad.stderr
    assert not (tmp_path / "out2" / "config.json").exists()
    assert any(p.startswith("objects/") for p, _, _ in srv.stats.log)


async def test_manifest_only_flags_are_refused_for_hub_references(hub: Hub, tmp_path: Path) -> None:
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    base = ["--data-dir", str(tmp_path / "d"), "fetch", f"hf://{REPO}", "--cache-dir", str(tmp_path / "c")]
    res = await run_cli([*base, "--mirror", "http://127.0.0.1:9/"], env, check=False)
    assert res.returncode != 0 and b"--mirror" in res.stderr and b"--endpoint" in res.stderr
    # Mirrors and trust keys from the environment (or the config file) are for manifests: no refusal.
    await run_cli(base, {**env, "AUTOGLM_MIRRORS": "http://127.0.0.1:9/", "AUTOGLM_TRUST": str(tmp_path / "k.pub")})


async def test_expired_cdn_urls_are_resolved_again(tmp_path: Path) -> None:
    """The Hub's CDN URLs are signed and expire: a remembered one that is refused is resolved again."""
    srv = HubServer(tmp_path / "root", relative_cdn=True)
    srv.sig_uses = 3
    files = model_files(seed=12, big=1 << 20)
    commit = srv.add_commit(REPO, files)
    config = MirrorConfig(initial_connections=1, max_connections=1, max_request_bytes=64 << 10, backoff_base=0.01, backoff_cap=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        plan = HubFetchPlan(parse_ref(f"hf://{REPO}"), (f"http://127.0.0.1:{srv.port}",), cache_dir=tmp_path / "cache", piece_size=64 << 10)
        snap = await _fetch(plan, tmp_path, config)
        nursery.cancel_scope.cancel()
    assert snap.name == commit
    _same(snap, files)
    redirects = [p for p, st, _ in srv.stats.log if p == "big.safetensors" and st == 302]
    refused = [p for p, st, _ in srv.stats.log if st == 403]
    assert refused and len(redirects) > len(files["big.safetensors"]) // (64 << 10) // 3
