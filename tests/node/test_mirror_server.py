"""The static mirror served over real 127.0.0.1 sockets."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from autoglm.node._mirror_server import MirrorStats, serve_mirror


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "a b.txt").write_bytes(b"hello")
    return tmp_path


async def _with_server(site: Path, fn):  # type: ignore[no-untyped-def]
    stats = MirrorStats()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_mirror, site, "127.0.0.1", 0, stats)
        assert host == "127.0.0.1"
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", trust_env=False) as client:
            with trio.fail_after(10):
                await fn(client)
        nursery.cancel_scope.cancel()
    return stats


async def test_get_range_and_stats(site: Path) -> None:
    body = (site / "sub" / "w.bin").read_bytes()

    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/sub/w.bin")
        assert r.status_code == 200 and r.content == body
        r = await c.get("/sub/w.bin", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == body[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(body)}"
        r = await c.get("/sub/w.bin", headers={"Range": "bytes=-5"})
        assert r.content == body[-5:]
        r = await c.get("/a%20b.txt")
        assert r.content == b"hello"

    stats = await _with_server(site, check)
    assert stats.requests == 4
    assert stats.body_bytes == len(body) + 10 + 5 + 5


async def test_if_range_mismatch_gives_whole_file(site: Path) -> None:
    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/a%20b.txt", headers={"Range": "bytes=0-1", "If-Range": '"stale"'})
        assert r.status_code == 200 and r.content == b"hello"
        etag = r.headers["etag"]
        r = await c.get("/a%20b.txt", headers={"Range": "bytes=0-1", "If-Range": etag})
        assert r.status_code == 206 and r.content == b"he"

    await _with_server(site, check)


@pytest.mark.parametrize("target", ["/../etc/passwd", "/sub/../../x", "/%2e%2e/x", "/sub", "/missing"])
async def test_refuses_traversal_and_missing(site: Path, target: str) -> None:
    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get(target)
        assert r.status_code == 404

    await _with_server(site, check)


async def test_unsatisfiable_range(site: Path) -> None:
    async def check(c: httpx.AsyncClient) -> None:
        r = await c.get("/a%20b.txt", headers={"Range": "bytes=100-"})
        assert r.status_code == 416
        assert r.headers["content-range"] == "bytes */5"

    await _with_server(site, check)
