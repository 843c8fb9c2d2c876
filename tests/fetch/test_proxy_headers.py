"""HTTP(S)_PROXY / NO_PROXY and per-mirror headers."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from autoglm.node.api import FetchOptions, NodeConfig, open_node

from .conftest import Published
from .faultserver import FaultServer


async def _fetch(pub: Published, tmp: Path, mirrors: list[str], headers: dict[str, dict[str, str]] | None = None) -> None:
    async with open_node(NodeConfig(tmp / "data")) as node:
        with trio.fail_after(60):
            await node.fetch(pub.manifest_path, out=tmp / "out", trust=pub.trust, mirrors=mirrors,
                             mirror_headers=headers, options=FetchOptions(space_margin=0))
    pub.assert_identical(tmp / "out")


async def test_http_proxy_is_used(published: Published, server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fault server doubles as the proxy: it answers absolute-form requests itself,
    # so the made-up mirror host is never resolved or dialled.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    await _fetch(published, tmp_path, ["http://mirror.invalid/"])
    assert server.stats.proxied == server.stats.requests > 0


async def test_no_proxy_bypasses(published: Published, server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    await _fetch(published, tmp_path, [server.url])
    assert server.stats.proxied == 0


async def test_per_mirror_headers(published: Published, server: FaultServer, server2: FaultServer, tmp_path: Path) -> None:
    await _fetch(published, tmp_path, [server.url, server2.url], {server.url: {"Authorization": "Bearer s3cret"}})
    assert server.stats.headers and all(h.get("authorization") == "Bearer s3cret" for h in server.stats.headers)
    assert all("authorization" not in h for h in server2.stats.headers)
