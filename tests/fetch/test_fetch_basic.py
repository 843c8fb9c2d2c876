"""Happy path and resume through the public API against a real 127.0.0.1 server."""

from __future__ import annotations

from pathlib import Path

import trio

from autoglm.node._mirrors import MirrorConfig
from autoglm.node.api import FetchOptions, NodeConfig, open_node

from .conftest import Published
from .faultserver import FaultServer

FAST = MirrorConfig(stall_timeout=2.0, backoff_base=0.01, backoff_cap=0.2, max_request_bytes=256 << 10)


async def _fetch(pub: Published, data: Path, out: Path, mirrors: list[str], **kw: object):  # type: ignore[no-untyped-def]
    async with open_node(NodeConfig(data, FAST)) as node:
        with trio.fail_after(60):
            return await node.fetch(pub.manifest_path, out=out, trust=pub.trust, mirrors=mirrors, options=FetchOptions(space_margin=0), **kw)


async def test_fetch_whole_model(published: Published, server: FaultServer, tmp_path: Path) -> None:
    res = await _fetch(published, tmp_path / "data", tmp_path / "out", [server.url])
    published.assert_identical(tmp_path / "out")
    assert res.bytes_total == published.signed.manifest.total_size
    assert sum(res.bytes_by_source.values()) == res.bytes_total
    assert server.stats.body_bytes == res.bytes_total
    assert not (tmp_path / "out" / ".autoglm-partial").exists() or not any((tmp_path / "out" / ".autoglm-partial").iterdir())


async def test_second_fetch_is_free_and_other_dir_copies_locally(published: Published, server: FaultServer, tmp_path: Path) -> None:
    await _fetch(published, tmp_path / "data", tmp_path / "out", [server.url])
    served = server.stats.body_bytes
    res = await _fetch(published, tmp_path / "data", tmp_path / "out", [server.url])
    assert server.stats.body_bytes == served and res.bytes_by_source == {}
    res = await _fetch(published, tmp_path / "data", tmp_path / "out2", [server.url])
    published.assert_identical(tmp_path / "out2")
    assert server.stats.body_bytes == served
    assert res.bytes_by_source == {"local:store": res.bytes_total}


def _stage_prefix(pub: Published, data: Path, out: Path, garbage: bool) -> tuple[int, int, int]:
    """Leave 40 % of one piece of the model in the staging file, as a killed fetch would."""
    from autoglm.node._store import Store

    store = Store(data)
    dl = store.open_download(pub.signed, out)
    fi = next(i for i, f in enumerate(dl.manifest.files) if f.path == "model.safetensors")
    index = max(dl.file_starts[fi] + k for k, _ in enumerate(dl.manifest.files[fi].pieces) if k > 0)
    p = dl.pieces[index]
    assert p.length >= 48 << 10
    n = (p.length * 2 // 5) // 4096 * 4096
    body = (pub.root / "model.safetensors").read_bytes()[p.offset : p.offset + n]
    dl.write(index, 0, bytes(b ^ 1 for b in body) if garbage else body)
    dl.close()
    store.close()
    return index, p.offset, n


async def test_resume_mid_piece(published: Published, server: FaultServer, tmp_path: Path) -> None:
    _, offset, n = await trio.to_thread.run_sync(_stage_prefix, published, tmp_path / "data", tmp_path / "out", False)
    await _fetch(published, tmp_path / "data", tmp_path / "out", [server.url])
    published.assert_identical(tmp_path / "out")
    assert any(rng is not None and rng.startswith(f"bytes={offset + n}-") for _, _, rng in server.stats.log)
    assert server.stats.body_bytes == published.signed.manifest.total_size - n


async def test_resume_mid_piece_with_bad_prefix(published: Published, server: FaultServer, tmp_path: Path) -> None:
    await trio.to_thread.run_sync(_stage_prefix, published, tmp_path / "data", tmp_path / "out", True)
    res = await _fetch(published, tmp_path / "data", tmp_path / "out", [server.url])
    published.assert_identical(tmp_path / "out")
    assert sum(res.bytes_by_source.values()) == res.bytes_total


async def test_sync_wrapper(published: Published, server: FaultServer, tmp_path: Path) -> None:
    from autoglm.node.api import fetch

    # The wrapper runs its own trio loop; here it runs in a worker thread while this loop serves.
    res = await trio.to_thread.run_sync(
        lambda: fetch(published.manifest_path, out=tmp_path / "out", trust=published.trust, mirrors=[server.url],
                      data_dir=tmp_path / "data", options=FetchOptions(space_margin=0))
    )
    published.assert_identical(tmp_path / "out")
    assert res.bytes_total == published.signed.manifest.total_size
