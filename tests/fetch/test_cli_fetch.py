"""The fetch/ls/gc commands in a subprocess, against the in-process 127.0.0.1 mirror."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from .conftest import Published
from .faultserver import FaultServer

CLI = [sys.executable, "-m", "autoglm.node.cli"]


async def run_cli(*args: str) -> trio.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process([*CLI, *args], capture_stdout=True, capture_stderr=True, check=False)


def fetch_args(pub: Published, tmp: Path, *mirrors: str, manifest: str | None = None) -> list[str]:
    args = ["--data-dir", str(tmp / "data"), "fetch", manifest or str(pub.manifest_path), "--out", str(tmp / "out"),
            "--trust", str(pub.pub_path), "--json", "--stall-timeout", "2", "--check-sha256"]
    for m in mirrors:
        args += ["--mirror", m]
    return args


async def test_fetch_json_then_ls_and_gc(published: Published, server: FaultServer, tmp_path: Path) -> None:
    p = await run_cli(*fetch_args(published, tmp_path, server.url))
    assert p.returncode == 0, p.stderr.decode()
    lines = [json.loads(ln) for ln in p.stdout.decode().splitlines()]
    assert lines[0]["event"] == "start"
    done = lines[-1]
    assert done["event"] == "done"
    assert done["bytes_total"] == published.signed.manifest.total_size
    assert done["bytes_by_source"] == {f"mirror:{server.url}": done["bytes_total"]}
    assert done["refetched_bytes"] == 0 and done["seconds"] > 0
    published.assert_identical(tmp_path / "out")

    p = await run_cli("--data-dir", str(tmp_path / "data"), "ls", "--json")
    row = json.loads(p.stdout)
    assert row["complete"] and row["name"] == "test/model" and row["pieces_done"] == row["pieces_total"]

    stale = tmp_path / "out" / ".autoglm-partial" / "deadbeef"
    stale.mkdir(parents=True)
    (stale / "0.part").write_bytes(b"x")
    p = await run_cli("--data-dir", str(tmp_path / "data"), "gc", "--json")
    assert p.returncode == 0
    assert not stale.exists()
    published.assert_identical(tmp_path / "out")


async def test_manifest_from_url(published: Published, server: FaultServer, tmp_path: Path) -> None:
    (published.root / "model.agm").write_bytes(published.manifest_path.read_bytes())
    p = await run_cli(*fetch_args(published, tmp_path, server.url, manifest=server.url + "model.agm"))
    assert p.returncode == 0, p.stderr.decode()
    published.assert_identical(tmp_path / "out")


async def test_bad_signature_is_refused_before_any_byte(published: Published, server: FaultServer, tmp_path: Path) -> None:
    blob = bytearray(published.manifest_path.read_bytes())
    blob[-5] ^= 0x01  # inside the signature
    bad = tmp_path / "bad.agm"
    bad.write_bytes(bytes(blob))
    p = await run_cli(*fetch_args(published, tmp_path, server.url, manifest=str(bad)))
    assert p.returncode in (3, 5), p.stderr.decode()
    assert b"signature" in p.stderr.lower() or b"manifest" in p.stderr.lower()
    assert server.stats.requests == 0
    assert not (tmp_path / "out").exists()


async def test_untrusted_key_is_refused(published: Published, server: FaultServer, tmp_path: Path) -> None:
    from autoglm.protocol import encode_public_key, generate_private_key

    other = tmp_path / "other.pub"
    other.write_bytes(encode_public_key(generate_private_key()))
    args = fetch_args(published, tmp_path, server.url)
    args[args.index("--trust") + 1] = str(other)
    p = await run_cli(*args)
    assert p.returncode == 4, p.stderr.decode()
    assert server.stats.requests == 0


async def test_mirror_answering_html(published: Published, server: FaultServer, tmp_path: Path) -> None:
    server.add("html", count=10_000)
    p = await run_cli(*fetch_args(published, tmp_path, server.url))
    assert p.returncode == 6, p.stderr.decode()
    err = " ".join(p.stderr.decode().split())
    assert "HTML page" in err and "--mirror" in err


async def test_unknown_host(published: Published, tmp_path: Path) -> None:
    p = await run_cli(*fetch_args(published, tmp_path, "http://nonexistent.invalid/models/"))
    assert p.returncode == 6, p.stderr.decode()
    assert "cannot resolve host 'nonexistent.invalid'" in " ".join(p.stderr.decode().split())
    last = json.loads(p.stdout.decode().splitlines()[-1])
    assert last["event"] == "error" and last["error"] == "NoSourceError"


async def test_manifest_url_answering_html(published: Published, server: FaultServer, tmp_path: Path) -> None:
    server.add("html", count=10_000)
    p = await run_cli(*fetch_args(published, tmp_path, server.url, manifest=server.url + "model.agm"))
    assert p.returncode == 5, p.stderr.decode()
    assert "HTML page" in " ".join(p.stderr.decode().split())


async def test_variant_fetches_only_its_files(tmp_path: Path) -> None:
    import time as _time

    from autoglm.node._publish import VariantSpec, build_manifest
    from autoglm.node._sample import write_sample_model
    from autoglm.protocol import (
        encode_public_key,
        generate_private_key,
        key_id,
        parse_public_key,
        sign_manifest,
    )

    root = tmp_path / "pub"
    write_sample_model(root, size=256 << 10)
    key = generate_private_key()
    raw = parse_public_key(encode_public_key(key))
    m = build_manifest(root, name="v/model", version="1", publisher=key_id(raw), created_at=int(_time.time()),
                       variants=[VariantSpec("configs", ("*.json",))])
    (tmp_path / "m.agm").write_bytes(sign_manifest(m, key).encode())
    (tmp_path / "k.pub").write_bytes(encode_public_key(key))
    srv = FaultServer(root)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        p = await run_cli("--data-dir", str(tmp_path / "data"), "fetch", str(tmp_path / "m.agm"), "--mirror", srv.url,
                          "--out", str(tmp_path / "out"), "--trust", str(tmp_path / "k.pub"), "--variant", "configs", "--json")
        nursery.cancel_scope.cancel()
    assert p.returncode == 0, p.stderr.decode()
    got = sorted(x.name for x in (tmp_path / "out").iterdir())
    assert got == sorted(f.path for f in m.files if f.path.endswith(".json"))
    assert "model.safetensors" not in srv.stats.by_path


def test_mirror_header_parsing() -> None:
    import argparse

    import pytest

    from autoglm.node.cli._fetch_cmds import _mirror_headers
    from autoglm.node.errors import ConfigError

    ns = argparse.Namespace(
        mirror=["https://a.example/m/", "https://b.example/x?sig=1"],
        header=["X-Common: 1"],
        mirror_header=["https://a.example/m=Authorization: Bearer abc==", "https://b.example/x?sig=1=X-Key: k=v"],
    )
    h = _mirror_headers(ns)
    assert h["https://a.example/m/"] == {"X-Common": "1", "Authorization": "Bearer abc=="}
    assert h["https://b.example/x?sig=1"] == {"X-Common": "1", "X-Key": "k=v"}
    ns.mirror_header = ["https://c.example/=A: b"]
    with pytest.raises(ConfigError, match="not one of the --mirror URLs"):
        _mirror_headers(ns)
