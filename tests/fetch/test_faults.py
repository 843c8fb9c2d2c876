"""Every fault the mirror can inject is survived, and the result is byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from autoglm.node._http import open_connection, parse_url
from autoglm.node._mirrors import MirrorConfig
from autoglm.node._progress import Event, FetchDone, SourceFailed
from autoglm.node.api import FetchOptions, NodeConfig, open_node
from autoglm.node.errors import MirrorError

from .conftest import Published
from .faultserver import FaultServer

CFG = MirrorConfig(stall_timeout=1.5, backoff_base=0.01, backoff_cap=0.1, max_request_bytes=256 << 10)
MODEL = "model.safetensors"


async def fetch_collect(pub: Published, tmp: Path, mirrors: list[str], cfg: MirrorConfig = CFG) -> tuple[object, list[Event]]:
    events: list[Event] = []
    send, recv = trio.open_memory_channel[Event](64)
    async with open_node(NodeConfig(tmp / "data", cfg)) as node, trio.open_nursery() as nursery:

        async def consume() -> None:
            async for ev in recv:
                events.append(ev)

        nursery.start_soon(consume)
        with trio.fail_after(60):
            res = await node.fetch(pub.manifest_path, out=tmp / "out", trust=pub.trust, mirrors=mirrors,
                                   events=send, options=FetchOptions(space_margin=0))
    pub.assert_identical(tmp / "out")
    return res, events


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("429", {"count": 2, "retry_after": 1}),
        ("503", {"count": 2, "retry_after": 1}),
        ("502", {"count": 3}),
        ("504", {"count": 3}),
        ("reset", {"count": 2, "after": 10_000, "path": MODEL}),
        ("truncate", {"count": 2, "after": 10_000, "path": MODEL}),
        ("trickle", {"count": 2, "chunk": 8192, "interval": 0.005, "path": MODEL}),
        ("stall", {"count": 1, "path": MODEL}),
    ],
)
async def test_fault_survived_single_mirror(kind: str, params: dict[str, object], published: Published, server: FaultServer, tmp_path: Path) -> None:
    server.add(kind, **params)
    t0 = trio.current_time()
    res, events = await fetch_collect(published, tmp_path, [server.url])
    if kind in ("429", "503"):
        assert trio.current_time() - t0 >= 1.0  # Retry-After honoured
    if kind != "trickle":  # a trickle is slow, not an error
        assert any(isinstance(e, SourceFailed) for e in events)


async def test_range_ignored_streams_file_once(published: Published, server: FaultServer, tmp_path: Path) -> None:
    server.add("norange", count=10_000)
    await fetch_collect(published, tmp_path, [server.url])
    size = published.signed.manifest.file(MODEL).size
    # At most one whole-file pass per connection that was open when the mirror
    # turned out to ignore Range, then one stream: not once per piece (~20x here).
    assert server.stats.by_path[MODEL] <= CFG.initial_connections * size


async def test_404_on_one_mirror_uses_the_other(published: Published, server: FaultServer, server2: FaultServer, tmp_path: Path) -> None:
    server.add("404", count=10_000, path=MODEL)
    res, _ = await fetch_collect(published, tmp_path, [server.url, server2.url])
    assert server2.stats.by_path[MODEL] >= published.signed.manifest.file(MODEL).size


@pytest.mark.parametrize("kind", ["wrong", "change"])
async def test_bad_bytes_demote_mirror(kind: str, published: Published, server: FaultServer, server2: FaultServer, tmp_path: Path) -> None:
    server.add(kind, count=3 if kind == "wrong" else 1, path=MODEL, only_range=True)
    res, events = await fetch_collect(published, tmp_path, [server.url, server2.url])
    bad = [e for e in events if isinstance(e, SourceFailed) and e.source_id == f"mirror:{server.url}"]
    assert any(e.integrity for e in bad), bad


async def test_unreachable_second_mirror_is_dropped(published: Published, server: FaultServer, tmp_path: Path) -> None:
    res, events = await fetch_collect(published, tmp_path, [server.url, "http://nonexistent.invalid/m/"])
    assert any(isinstance(e, SourceFailed) and "nonexistent.invalid" in e.source_id for e in events) or res


async def test_range_ignored_with_bad_bytes_does_not_stall(published: Published, server: FaultServer, server2: FaultServer, tmp_path: Path) -> None:
    # A whole-file body whose middle is corrupt: the bad piece was claimed, not requested.
    # It must go back to the picker (and to the other mirror), not hang as "requested".
    server.add("norange+wrong", count=10_000, path=MODEL)
    server2.delay = 0.3  # slow, so the bad mirror's stream usually reaches the corrupt piece first
    await fetch_collect(published, tmp_path, [server.url, server2.url])  # completes, byte-identical


async def test_closed_keepalive_connection_is_retried_without_blame(published: Published, server: FaultServer, tmp_path: Path) -> None:
    drop = server.add("drop", count=3, only_reused=True)
    res, events = await fetch_collect(published, tmp_path, [server.url])
    assert drop.count == 0  # all three happened
    assert not any(isinstance(e, SourceFailed) for e in events)


async def test_endgame_duplicates_rescue_a_trickling_mirror(published: Published, server: FaultServer, server2: FaultServer, tmp_path: Path) -> None:
    # Mirror 1 sends 1 KiB every 50 ms on every request (its pieces would take minutes);
    # mirror 2 is fast. Endgame duplicates mirror 1's outstanding pieces on mirror 2,
    # and mirror 1's requests are cancelled once their pieces are in.
    server.add("trickle", count=1_000_000, chunk=1024, interval=0.05)
    res, _ = await fetch_collect(published, tmp_path, [server.url, server2.url])
    by = res.bytes_by_source  # type: ignore[attr-defined]
    assert by.get(f"mirror:{server2.url}", 0) > by.get(f"mirror:{server.url}", 0)
    assert server.stats.body_bytes < published.signed.manifest.total_size // 4


async def test_received_bytes_reconcile_with_the_server_log(published: Published, server: FaultServer, tmp_path: Path) -> None:
    # Two bodies cut off after 10,000 bytes: those bytes were sent and read, but no piece
    # came of them. bytes_by_source counts the pieces; received_by_source every body byte.
    server.add("truncate", count=2, after=10_000, path=MODEL)
    res, events = await fetch_collect(published, tmp_path, [server.url])
    sid = f"mirror:{server.url}"
    rx = res.received_by_source  # type: ignore[attr-defined]
    assert rx == {sid: server.stats.body_bytes}
    assert rx[sid] > res.bytes_by_source[sid]  # type: ignore[attr-defined]
    done = [e for e in events if isinstance(e, FetchDone)]
    assert done and done[-1].received_by_source == rx


async def test_cancelled_duplicates_are_counted_as_received(published: Published, server: FaultServer, server2: FaultServer, tmp_path: Path) -> None:
    server.add("trickle", count=1_000_000, chunk=1024, interval=0.05)
    res, _ = await fetch_collect(published, tmp_path, [server.url, server2.url])
    slow = f"mirror:{server.url}"
    rx = res.received_by_source  # type: ignore[attr-defined]
    assert rx.get(slow, 0) > res.bytes_by_source.get(slow, 0)  # type: ignore[attr-defined]
    assert rx[slow] <= server.stats.body_bytes  # bytes still in flight when we hung up were not received


async def test_connection_with_an_unread_body_is_never_reused(published: Published, server: FaultServer) -> None:
    # A request cancelled mid-body leaves the rest of the body on the socket; the next
    # request on that connection would read those bytes as its response head.
    url = parse_url(server.url + MODEL)
    conn = await open_connection(url)
    try:
        resp = await conn.request("GET", url.path, {"Range": "bytes=0-1048575"})
        assert resp.status == 206
        buf = memoryview(bytearray(4096))
        with trio.CancelScope() as cs:
            cs.cancel()
            await conn.read_into(buf)  # cancelled: nothing or a little read
        assert await conn.read_into(buf) > 0  # part-way through the body
        with pytest.raises(MirrorError, match="unread"):
            await conn.request("GET", url.path, {})
        assert not conn.reusable
    finally:
        await conn.aclose()
